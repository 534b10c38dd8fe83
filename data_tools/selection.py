"""select: the paper's acquisition criteria (Appendix A.1), each overridable; a reject names every
criterion that failed, with the value found."""

from dataclasses import dataclass
from functools import partial

from data_tools.media import ASPECTS, nearest_aspect, parse_aspects
from data_tools.stage import Reject

PROBE_FIELDS = ("fps", "duration", "width", "height")


@dataclass(frozen=True)
class Criteria:
    fps: tuple = (16.0, 45.0)
    duration: tuple = (5.0, 6.0)
    min_edge: int = 512
    aspects: tuple = ("9:16", "3:4", "1:1", "16:9")
    aspect_tolerance: float = 0.1  # relative deviation from the nearest bucket's ratio


def select(record: dict, criteria: Criteria) -> dict:
    """The record with its `aspect_bucket`, or Reject listing each failed criterion."""
    missing = [f for f in PROBE_FIELDS if f not in record]
    if missing:
        raise Reject(f"missing {missing} (run probe first)")
    failed = []
    lo, hi = criteria.fps
    if not lo <= record["fps"] <= hi:
        failed.append(f"fps {record['fps']:.2f} outside [{lo:g}, {hi:g}]")
    lo, hi = criteria.duration
    if not lo <= record["duration"] <= hi:
        failed.append(f"duration {record['duration']:.2f} s outside [{lo:g}, {hi:g}] s")
    edge = min(record["width"], record["height"])
    if edge < criteria.min_edge:
        failed.append(f"shortest edge {edge} < {criteria.min_edge}")
    bucket, deviation = nearest_aspect(record["width"], record["height"], criteria.aspects)
    if deviation > criteria.aspect_tolerance:
        failed.append(f"aspect {record['width']}x{record['height']} ({record['width'] / record['height']:.3f}) "
                      f"is {deviation:.0%} from the nearest bucket {bucket}; allowed "
                      f"{criteria.aspect_tolerance:.0%} of {','.join(criteria.aspects)}")
    if failed:
        raise Reject("; ".join(failed))
    return {**record, "aspect_bucket": bucket}


def add_arguments(parser) -> None:
    parser.description = __doc__
    d = Criteria()
    parser.add_argument("--fps", type=float, nargs=2, default=d.fps, metavar=("MIN", "MAX"))
    parser.add_argument("--duration", type=float, nargs=2, default=d.duration, metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--min-edge", type=int, default=d.min_edge)
    parser.add_argument("--aspects", type=parse_aspects, default=list(d.aspects),
                        help=f"comma list of buckets among {sorted(ASPECTS)} (human-centric sets: 9:16,3:4,1:1; "
                             f"OpenVid-style: 16:9); default all of {','.join(d.aspects)}")
    parser.add_argument("--aspect-tolerance", type=float, default=d.aspect_tolerance)


def make(args):
    return partial(select, criteria=Criteria(tuple(args.fps), tuple(args.duration), args.min_edge,
                                             tuple(args.aspects), args.aspect_tolerance))
