"""filter: static scenes, frequent cuts, slideshows/montages, and (optionally) text overlays.

Scores, all written into the record so thresholds can be tuned afterwards:
- `motion`: mean absolute difference of consecutive frames sampled at `--sample-fps`, grayscale, 0-255,
  read at a reduced size by the one reader of every stage (data_tools.media: the stream probe chose, as displayed);
  pairs that straddle a cut are left out.
- `cuts`: shot boundaries (seconds) from PySceneDetect's ContentDetector; `shots` = cuts + 1.
- `shot_motion`: median of each shot's own motion; a slideshow/montage is many shots that are each still.
- `text_score`: from `--text-detector CMD` (run as `CMD VIDEO`, a number on standard output), when given.
"""

import shlex
import subprocess
from dataclasses import dataclass
from functools import partial

import numpy as np

from data_tools.media import decoded, display_size, stream_info, to_rgb
from data_tools.stage import Reject


@dataclass(frozen=True)
class Thresholds:
    sample_fps: float = 4.0
    min_motion: float = 1.0  # below: a static scene
    max_cuts: int = 2  # above: frequent transitions
    slideshow_shots: int = 3  # at least this many shots ...
    slideshow_motion: float = 1.0  # ... each with median motion below this: a slideshow / montage
    cut_threshold: float = 27.0  # ContentDetector's threshold
    text_detector: str | None = None
    max_text_score: float = 0.5


def _scan(path, stream, t: Thresholds):
    """One pass over the displayed frames (the media reader): the cut times, by PySceneDetect's ContentDetector
    on every frame scaled to about 256 wide (its own default), and grayscale samples (short side 64) at about
    `t.sample_fps`: (cut seconds, sample seconds, samples [n, h, w] float32)."""
    from scenedetect import ContentDetector, FrameTimecode

    info, sar = stream_info(path, stream)
    detector, cuts, times, samples = ContentDetector(threshold=t.cut_threshold), [], [], []
    rate, position = info.get("rate", 25.0), None
    for i, (seconds, frame) in enumerate(decoded(path, info.get("stream"))):
        if i == 0:
            width, height = display_size(frame, sar)
            scale, small = max(1.0, width / 256), 64 / min(width, height)
            detect_size = (max(2, round(width / scale)), max(2, round(height / scale)))
            gray_size = (max(2, round(width * small)), max(2, round(height * small)))
        times.append(seconds)
        position = FrameTimecode(i, fps=rate)
        bgr = np.ascontiguousarray(to_rgb(frame, *detect_size)[..., ::-1])
        cuts += detector.process_frame(position, bgr)
        if seconds >= times[0] + len(samples) / t.sample_fps - 1e-9:
            samples.append((seconds, to_rgb(frame, *gray_size, fmt="gray").astype(np.float32)))
    if position is None:
        raise Reject("no decodable video frames")
    cuts += detector.post_process(position)
    cut_times = [round(times[c.frame_num] - times[0], 3) for c in sorted(set(cuts)) if c.frame_num < len(times)]
    return cut_times, np.array([s for s, _ in samples]) - times[0], np.stack([g for _, g in samples])


def _text_score(command: str, path) -> float:
    done = subprocess.run([*shlex.split(command), str(path)], capture_output=True, text=True, timeout=600)
    try:
        return float(done.stdout.strip().split()[-1])
    except (ValueError, IndexError):
        raise Reject(f"text detector {command!r} printed no number (exit {done.returncode}): "
                     f"{done.stderr.strip()[-300:]}") from None


def scores(path, t: Thresholds, stream: int | None = None) -> dict:
    """Motion, cuts, shots and per-shot motion of one video (and its text score when a detector is set)."""
    cuts, times, gray = _scan(path, stream, t)
    shot_of = np.searchsorted(np.array(cuts), times, side="right")  # shot index of every sample
    diffs = np.abs(np.diff(gray, axis=0)).mean(axis=(1, 2))
    same_shot = shot_of[1:] == shot_of[:-1]
    per_shot = [float(diffs[same_shot & (shot_of[1:] == s)].mean()) for s in range(len(cuts) + 1)
                if (same_shot & (shot_of[1:] == s)).any()]
    out = {"motion": float(diffs[same_shot].mean()) if same_shot.any() else 0.0, "cuts": cuts,
           "shots": len(cuts) + 1, "shot_motion": float(np.median(per_shot)) if per_shot else 0.0}
    if t.text_detector:
        out["text_score"] = _text_score(t.text_detector, path)
    return out


def filter_video(record: dict, thresholds: Thresholds) -> dict:
    """The record with its scores, or Reject naming each failed check with its score."""
    s = scores(record["path"], thresholds, record.get("stream"))
    failed = []
    if s["shots"] >= thresholds.slideshow_shots and s["shot_motion"] < thresholds.slideshow_motion:
        failed.append(f"slideshow/montage: {s['shots']} shots with median shot motion {s['shot_motion']:.2f} "
                      f"< {thresholds.slideshow_motion:g}")
    elif s["motion"] < thresholds.min_motion:
        failed.append(f"static: motion {s['motion']:.2f} < {thresholds.min_motion:g}")
    if len(s["cuts"]) > thresholds.max_cuts:
        failed.append(f"frequent cuts: {len(s['cuts'])} > {thresholds.max_cuts} (at {s['cuts']} s)")
    if "text_score" in s and s["text_score"] > thresholds.max_text_score:
        failed.append(f"text overlay: score {s['text_score']:.2f} > {thresholds.max_text_score:g}")
    if failed:
        raise Reject("; ".join(failed) + f" | scores {s}")
    return {**record, "filter_scores": s}


def add_arguments(parser) -> None:
    parser.description = __doc__
    d = Thresholds()
    parser.add_argument("--sample-fps", type=float, default=d.sample_fps)
    parser.add_argument("--min-motion", type=float, default=d.min_motion)
    parser.add_argument("--max-cuts", type=int, default=d.max_cuts)
    parser.add_argument("--slideshow-shots", type=int, default=d.slideshow_shots)
    parser.add_argument("--slideshow-motion", type=float, default=d.slideshow_motion)
    parser.add_argument("--cut-threshold", type=float, default=d.cut_threshold)
    parser.add_argument("--text-detector", help="command run as `CMD VIDEO` printing a text-overlay score")
    parser.add_argument("--max-text-score", type=float, default=d.max_text_score)


def make(args):
    return partial(filter_video, thresholds=Thresholds(
        args.sample_fps, args.min_motion, args.max_cuts, args.slideshow_shots, args.slideshow_motion,
        args.cut_threshold, args.text_detector, args.max_text_score))
