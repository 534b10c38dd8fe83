"""normalize: GT videos to the model's format (Appendix A.1): 16 fps resampled by timestamps, the first
81 frames (shorter videos are rejected), cover-scaled so the short side is `--min-side` (720) and
center-cropped to the nearest aspect bucket (sides multiples of 16), H.264 via PyAV (`--format wan2.2-ti2v`:
TI2V-5B's 24 fps, 121 frames, 1280x704 or 704x1280, sides multiples of 32 with --min-side); the first frame
as the reference image (PNG) and the prompt, from `--captions` (CSV or JSONL; OpenVid-1M's CSV as is)
or an external `--captioner CMD` (run as `CMD VIDEO`, the caption read from its standard output). A video finds
its caption row by its most specific name (id, relative path, file name, stem: see data_tools.stage.VideoTable).

Outputs: DIR/videos/ID.mp4 and DIR/images/ID.png; the record keeps the source's fields under `source`.
"""

import functools
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image

from data_tools.media import (
    Geometry,
    bucket_size,
    cover_geometry,
    encode_h264,
    nearest_aspect,
    parse_aspects,
    resampled_frames,
    transform,
    video_metadata,
)
from data_tools.stage import Reject, VideoTable, read_table
from megatron_wan.files import atomic_path

MEDIA_FIELDS = ("path", "fps", "frames", "duration", "width", "height", "aspect", "codec", "size_bytes", "sha256",
                "probe_backend", "stream", "stored_width", "stored_height", "sar", "rotation", "colorspace")
CAPTION_KEYS = ("caption", "prompt", "text")
VIDEO_KEYS = ("id", "video", "path", "file", "filename")


@dataclass(frozen=True)
class Spec:
    fps: int = 16
    frames: int = 81
    min_side: int = 720
    aspects: tuple = ("9:16", "3:4", "1:1", "16:9")
    crf: int = 17
    preset: str = "faster"
    sizes: tuple = ()  # (aspect, width, height) of buckets whose size is fixed (a --format's), else bucket_size
    multiple: int = 16  # what the sides of a computed bucket divide by (the model's VAE stride x patch)

    def size(self, aspect: str) -> tuple[int, int]:
        """(width, height) of the aspect bucket `aspect`."""
        fixed = {a: (w, h) for a, w, h in self.sizes}
        return fixed.get(aspect) or bucket_size(aspect, self.min_side, self.multiple)


# --format: a model's native training format; --fps, --frames, --min-side and --aspects override its values
FORMATS = {
    "wan2.1": dict(fps=16, frames=81, min_side=720, aspects=("9:16", "3:4", "1:1", "16:9")),
    "wan2.2-ti2v": dict(fps=24, frames=121, min_side=704, aspects=("9:16", "16:9"), multiple=32,  # TI2V-5B: / 32
                        sizes=(("16:9", 1280, 704), ("9:16", 704, 1280))),
    "world": dict(fps=16, frames=17, min_side=32, aspects=("1:1",), sizes=(("1:1", 32, 32),)),  # data_tools.world
}


def normalize_video(src, video_out: Path, image_out: Path, geometry: Geometry, spec: Spec,
                    stream: int | None = None) -> dict:
    """Resample, scale, crop and encode `src` (its video stream `stream`, else the best one) into `video_out` with
    its first frame in `image_out`, each written under a temporary name and renamed when whole; returns the
    output's metadata."""
    video_out.parent.mkdir(parents=True, exist_ok=True)
    image_out.parent.mkdir(parents=True, exist_ok=True)
    first = []

    def frames():
        for frame in resampled_frames(src, spec.fps, spec.frames, stream):
            rgb = transform(frame, geometry)
            if not first:
                first.append(rgb)
            yield rgb

    with atomic_path(video_out) as tmp:
        encode_h264(tmp, frames(), spec.fps, spec.crf, spec.preset)
    with atomic_path(image_out) as tmp:
        Image.fromarray(first[0]).save(tmp, format="PNG")
    return video_metadata(video_out)


def carried(record: dict, meta: dict, **fields) -> dict:
    """A normalized record: the earlier fields, the source's media fields under `source`, the output's own."""
    out = {k: v for k, v in record.items() if k not in MEDIA_FIELDS}
    out["source"] = {k: record[k] for k in MEDIA_FIELDS if k in record}
    return {**out, **meta, **fields}


@functools.cache
def load_captions(path: str) -> VideoTable:
    """The captions of a CSV or JSONL file (OpenVid-1M's `video,caption` CSV as is) by video: each row under its
    id/video/path value. A row whose caption is empty, whitespace, null or missing is kept as such (its videos
    are rejected naming it); a row that names no video is reported; a file with neither column is an error."""
    rows, unnamed = [], []
    table = read_table(path)
    columns = {k for row in table for k in row}
    if table and not (columns & set(VIDEO_KEYS) and columns & set(CAPTION_KEYS)):
        raise ValueError(f"{path}: needs a video column ({'/'.join(VIDEO_KEYS)}) and a caption column "
                         f"({'/'.join(CAPTION_KEYS)}); found columns {sorted(columns)}")
    for n, row in enumerate(table, 1):
        key = next((str(row[k]).strip() for k in VIDEO_KEYS if row.get(k) is not None and str(row[k]).strip()), None)
        text = next((str(row[k]).strip() for k in CAPTION_KEYS if isinstance(row.get(k), str) and row[k].strip()),
                    None)
        if key is None:
            unnamed.append(n)
        else:
            rows.append((n, key, text))
    if unnamed:
        print(f"{path}: rows {unnamed[:10]} name no video ({'/'.join(VIDEO_KEYS)}): ignored", file=sys.stderr)
    return VideoTable(path, rows)


def _caption(record: dict, captions: str | None) -> str | None:
    found = load_captions(captions).find(record) if captions else None
    if found is None:
        return record.get("prompt")
    n, text = found
    if text is None:
        raise Reject(f"caption row {n} of {captions} has no caption (empty, missing or null)")
    return text


def _run_captioner(command: str, video: Path) -> str:
    done = subprocess.run([*shlex.split(command), str(video)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not done.stdout.strip():
        raise Reject(f"captioner {command!r} failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def normalize(record: dict, spec: Spec, out_dir: str, captions: str | None, captioner: str | None) -> dict:
    """One GT video to the training format; Reject when it is too short or has no prompt."""
    prompt = _caption(record, captions)
    if prompt is None and not captioner:
        raise Reject(f"no prompt for {record['id']!r}" + (f" in {captions}" if captions else "")
                     + " (give --captions or --captioner)")
    meta = video_metadata(record["path"]) if "width" not in record else record
    aspect, _ = nearest_aspect(meta["width"], meta["height"], spec.aspects)
    width, height = spec.size(aspect)
    out = Path(out_dir)
    video, image = out / "videos" / f"{record['id']}.mp4", out / "images" / f"{record['id']}.png"
    new = normalize_video(record["path"], video, image, cover_geometry(meta["width"], meta["height"], width, height),
                          spec, meta.get("stream"))
    if prompt is None:
        prompt = _run_captioner(captioner, video)
    return carried(record, new, path=str(video), image=str(image), prompt=prompt, aspect_bucket=aspect)


def add_spec_arguments(parser) -> None:
    d = Spec()
    parser.add_argument("--crf", type=int, default=d.crf, help="x264 quality (lower is better; 17 is near lossless)")
    parser.add_argument("--preset", default=d.preset, help="x264 speed preset")


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.add_argument("--format", choices=sorted(FORMATS), default="wan2.1",
                        help="the model's native format: wan2.1 (16 fps, 81 frames, short side 720), wan2.2-ti2v "
                             "(24 fps, 121 frames, 1280x704 / 704x1280), world (16 fps, 17 frames, 32x32: "
                             "data_tools world)")
    parser.add_argument("--fps", type=int, help="default: the format's")
    parser.add_argument("--frames", type=int, help="default: the format's")
    parser.add_argument("--min-side", type=int, help="default: the format's (given: bucket sizes from it)")
    parser.add_argument("--aspects", type=parse_aspects, help="default: the format's")
    add_spec_arguments(parser)
    parser.add_argument("--captions", help="CSV or JSONL with a video/id column and a caption/prompt column")
    parser.add_argument("--captioner", help="command run as `CMD VIDEO` that prints the caption")


def format_spec(name: str, fps=None, frames=None, min_side=None, aspects=None, crf=17, preset="faster") -> Spec:
    """The Spec of format `name` (FORMATS), each given value replacing the format's; a given min_side drops the
    format's fixed sizes."""
    values = dict(FORMATS[name])
    given = dict(fps=fps, frames=frames, min_side=min_side, aspects=tuple(aspects) if aspects else None)
    values.update({k: v for k, v in given.items() if v is not None})
    if min_side is not None:
        values.pop("sizes", None)
    return Spec(**values, crf=crf, preset=preset)


def make(args):
    spec = format_spec(args.format, args.fps, args.frames, args.min_side, args.aspects, args.crf, args.preset)
    captions = str(Path(args.captions).resolve()) if args.captions else None
    if captions:
        load_captions(captions)  # a missing or malformed captions file fails here, before any video
    return partial(normalize, spec=spec, out_dir=str(Path(args.out).resolve()), captions=captions,
                   captioner=args.captioner)
