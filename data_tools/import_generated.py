"""import-generated: videos made by any generator (Wan, Kling, CogVideoX, HunyuanVideo, ...) normalized to
their GT video's exact format: 16 fps by timestamps, 81 frames, the GT's width and height (cover-scale
and center-crop).

`--mapping` (CSV or JSONL) gives, per generated video, its `gt_id` and `generator`; a row is found by the
video's id, file name or stem (`video`/`id`/`path` column). `--gt` is the normalize stage's output.
"""

import functools
from functools import partial
from pathlib import Path

from data_tools.media import cover_geometry, video_metadata
from data_tools.normalize import Spec, add_spec_arguments, carried, normalize_video
from data_tools.stage import Reject, VideoTable, input_records, read_table

KEY_COLUMNS = ("video", "id", "path", "file", "filename")


@functools.cache
def load_mapping(path: str) -> VideoTable:
    """{"gt_id", "generator"} by video (data_tools.stage.VideoTable: a row is found by its most specific key)."""
    rows = []
    for n, row in enumerate(read_table(path), 1):
        key = next((str(row[k]) for k in KEY_COLUMNS if row.get(k)), None)
        if key is None or not row.get("gt_id") or not row.get("generator"):
            raise ValueError(f"{path}: row {n} needs a video column ({'/'.join(KEY_COLUMNS)}), gt_id and generator")
        rows.append((n, key, {"gt_id": str(row["gt_id"]), "generator": str(row["generator"])}))
    return VideoTable(path, rows)


@functools.cache
def load_gt(path: str) -> dict:
    return {r["id"]: r for r in input_records(path)}


def import_generated(record: dict, spec: Spec, out_dir: str, mapping: str, gt: str) -> dict:
    """One generated video in its GT's format, with gt_id, generator and the GT's prompt and image."""
    src = Path(record["path"])
    found = load_mapping(mapping).find(record)
    if found is None:
        raise Reject(f"not in the mapping {mapping}")
    entry = found[1]
    target = load_gt(gt).get(entry["gt_id"])
    if target is None:
        raise Reject(f"gt_id {entry['gt_id']!r} is not among the normalized GT videos in {gt}")
    meta = video_metadata(src)
    out = Path(out_dir)
    video, image = out / "videos" / f"{record['id']}.mp4", out / "images" / f"{record['id']}.png"
    geometry = cover_geometry(meta["width"], meta["height"], target["width"], target["height"])
    new = normalize_video(src, video, image, geometry, spec, meta.get("stream"))
    return carried({**record, **meta}, new, path=str(video), first_frame=str(image), gt_id=entry["gt_id"],
                   generator=entry["generator"], prompt=target.get("prompt"), image=target.get("image"),
                   aspect_bucket=target.get("aspect_bucket"))


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.add_argument("--mapping", required=True, help="CSV or JSONL: video, gt_id, generator")
    parser.add_argument("--gt", required=True, help="the normalize stage's output (directory or manifest)")
    parser.add_argument("--fps", type=int, default=Spec.fps)
    parser.add_argument("--frames", type=int, default=Spec.frames)
    add_spec_arguments(parser)


def make(args):
    mapping, gt = str(Path(args.mapping).resolve()), str(Path(args.gt).resolve())
    load_mapping(mapping)  # fail before any video on a missing or malformed file
    load_gt(gt)
    spec = Spec(fps=args.fps, frames=args.frames, crf=args.crf, preset=args.preset)
    return partial(import_generated, spec=spec, out_dir=str(Path(args.out).resolve()), mapping=mapping, gt=gt)
