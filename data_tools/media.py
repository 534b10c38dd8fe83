"""Video I/O for the stages: one reader for every stage (`decoded`: PyAV on the one stream probe chose, decord
as its one fallback), metadata measured from the displayed frames, frames as displayed (display rotation,
square pixels, the source's own colour matrix), 16 fps resampling by timestamps, cover-scale + center-crop
geometry; H.264 encoding (PyAV, libx264, BT.709 tagged) comes from megatron_wan.video_io, which the sampler
shares."""

import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from data_tools.stage import Reject
from megatron_wan.files import file_sha256
from megatron_wan.video_io import encode_h264 as encode_h264  # re-exported for the stages

# name -> (width, height) ratio; Wan 2.1 trains 16:9 and 9:16 at 720p; the paper adds 3:4 and 1:1
ASPECTS = {"16:9": (16, 9), "9:16": (9, 16), "4:3": (4, 3), "3:4": (3, 4), "1:1": (1, 1)}


def parse_aspects(text: str) -> list[str]:
    """'9:16,3:4,1:1' -> the bucket names, each checked."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ASPECTS]
    if unknown or not names:
        raise ValueError(f"--aspects: expected a comma list of {sorted(ASPECTS)}, found {text!r}")
    return names


def _stream(container, index=None):
    """The one video stream every stage reads: `index` (recorded by probe) when given, else FFmpeg's best video
    stream (av_find_best_stream, which prefers the stream marked default)."""
    if index is None:
        stream = container.streams.best("video")
    else:
        stream = next((s for s in container.streams.video if s.index == index), None)
    if stream is None:
        raise Reject("no video stream" if index is None else f"no video stream #{index} (the one probe chose)")
    stream.thread_type = "AUTO"
    return stream


def _decord_frames(path):
    """(seconds, frame) of every frame by decord (rotation applied by decord itself): the fallback reader."""
    import decord

    vr = decord.VideoReader(str(path), num_threads=1)
    for i in range(len(vr)):
        yield float(vr.get_frame_timestamp(i)[0]), av.VideoFrame.from_ndarray(vr[i].asnumpy(), format="rgb24")


def decoded(path, stream: int | None = None):
    """(seconds, av.VideoFrame) of every displayed frame of the video's stream (`stream`, else the best one), in
    display order: PyAV, or decord when PyAV cannot open or decode the file. The reader of every stage."""
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        yield from _fallback(path, e)
        return
    with container:
        s = _stream(container, stream)
        rate = float(s.average_rate or s.guessed_rate or 25)
        t, n = None, 0
        try:
            for frame in container.decode(s):
                if frame.pts is not None:
                    t = float(frame.pts * frame.time_base)
                else:
                    t = 0.0 if t is None else t + 1 / rate
                n += 1
                yield t, frame
        except av.FFmpegError as e:
            if n:
                raise
            yield from _fallback(path, e)


def _fallback(path, first):
    try:
        yield from _decord_frames(path)
    except Exception as second:  # decord raises its own error types
        raise Reject(f"not a readable video (PyAV: {clean_reason(first)}; decord: {clean_reason(second)})") from None


def display_size(frame: av.VideoFrame, sar=None) -> tuple[int, int]:
    """(width, height) of a frame as displayed: square pixels (`sar`, the stream's sample aspect ratio), rotated."""
    width = frame.width if not sar or sar == 1 else max(1, round(frame.width * sar))
    size = (width, frame.height)
    return size[::-1] if _rotation(frame) % 180 else size


def _rotation(frame: av.VideoFrame) -> int:
    """The frame's display rotation, counter-clockwise degrees in 0, 90, 180, 270."""
    return round(frame.rotation / 90) % 4 * 90


def stream_info(path, stream: int | None) -> tuple[dict, Fraction | None]:
    """({stream index, codec, rate}, sample aspect ratio) of the chosen stream; ({}, None) when PyAV cannot open
    it (the fallback reader then reads it)."""
    try:
        with av.open(str(path)) as container:
            s = _stream(container, stream)
            sar = s.sample_aspect_ratio
            rate = float(s.average_rate or s.guessed_rate or 25)
            return {"stream": s.index, "codec": s.codec_context.name, "rate": rate}, (sar if sar and sar > 0 else None)
    except av.FFmpegError:
        return {}, None


def video_metadata(path, stream: int | None = None) -> dict:
    """The displayed video of a file: fps, frames, duration (both from the displayed frames' timestamps), width
    and height as displayed (rotated, square pixels), aspect; the stream's index, stored size, sample aspect ratio,
    rotation, colour matrix and codec; file size and SHA-256.

    Raises Reject for an empty, unreadable, truncated or non-video file, with the readers' reasons.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise Reject("empty file (0 bytes)")
    info, sar = stream_info(path, stream)
    times, first, last = [], None, None
    try:
        for t, frame in decoded(path, info.get("stream")):
            first = frame if first is None else first
            last = frame
            times.append(t)
    except (av.FFmpegError, RuntimeError) as e:
        raise Reject(f"not a readable video (cut short or corrupt after {len(times)} frames: {clean_reason(e)})") \
            from None
    if not times:
        raise Reject("no decodable video frames")
    steps = np.diff(times)
    step = float(np.median(steps)) if len(steps) else 0.0
    tail = float(last.duration * last.time_base) if last.duration and last.time_base else step
    duration = times[-1] - times[0] + tail
    if duration <= 0:
        raise Reject(f"no usable timestamps ({len(times)} frames)")
    width, height = display_size(first, sar)
    return {"stream": info.get("stream"), "codec": info.get("codec", "unknown"), "fps": round(len(times) / duration, 6),
            "frames": len(times), "duration": round(duration, 6),
            "width": width, "height": height, "aspect": width / height, "stored_width": first.width,
            "stored_height": first.height, "sar": f"{sar.numerator}:{sar.denominator}" if sar else "1:1",
            "rotation": _rotation(first), "colorspace": _COLORSPACES.get(int(first.colorspace), "unspecified"),
            "probe_backend": "pyav" if info else "decord", "size_bytes": size, "sha256": file_sha256(path)}


_COLORSPACES = {0: "rgb", 1: "bt709", 2: "unspecified", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m",
                9: "bt2020nc", 10: "bt2020c"}
_LOG_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: (Check failed: )?|\[Errno -?\d+\] ")


def clean_reason(error: BaseException, limit: int = 240) -> str:
    """An exception as a one-line reason: the first line, without decoders' log prefixes (time, source file and
    line, errno), cut at a word boundary."""
    text = _LOG_PREFIX.sub("", str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def nearest_aspect(width: int, height: int, names) -> tuple[str, float]:
    """The bucket nearest in log aspect ratio, and the relative deviation from it."""
    ratio = width / height
    name = min(names, key=lambda a: abs(math.log(ratio * ASPECTS[a][1] / ASPECTS[a][0])))
    w, h = ASPECTS[name]
    return name, abs(ratio / (w / h) - 1)


@dataclass(frozen=True)
class Geometry:
    """Scale to (scaled_w, scaled_h), then crop (width, height) at (left, top)."""

    width: int
    height: int
    scaled_w: int
    scaled_h: int
    left: int
    top: int


def bucket_size(aspect: str, min_side: int, multiple: int = 16) -> tuple[int, int]:
    """Output (width, height) of a bucket: the short side min_side (rounded up), both sides multiples of
    `multiple`."""
    a, b = ASPECTS[aspect]
    short = math.ceil(min_side / multiple) * multiple
    long = max(short, round(short * max(a, b) / min(a, b) / multiple) * multiple)
    return (long, short) if a >= b else (short, long)


def cover_geometry(src_w: int, src_h: int, width: int, height: int) -> Geometry:
    """Scale a src_w x src_h frame to cover width x height (aspect kept), then crop its center."""
    s = max(width / src_w, height / src_h)
    sw, sh = max(width, round(src_w * s)), max(height, round(src_h * s))
    return Geometry(width, height, sw, sh, (sw - width) // 2, (sh - height) // 2)


def resampled_frames(path, fps: float, count: int | None, stream: int | None = None):
    """Yield `count` (all when None) frames at `fps`, each the source frame displayed at t0 + i/fps (nearest by
    presentation timestamps, so variable frame rates resample right), from `decoded`. Raises Reject when the video
    ends before `count`."""
    made, t0, prev = 0, None, None
    for t, frame in decoded(path, stream):
        t0 = t if t0 is None else t0
        while (count is None or made < count) and t >= t0 + made / fps - 1e-9:
            target = t0 + made / fps
            use_prev = prev is not None and target - prev[0] <= t - target
            yield prev[1] if use_prev else frame
            made += 1
        if made == count:
            return
        prev = (t, frame, frame.duration * frame.time_base if frame.duration and frame.time_base else 0)
    last_shown = prev[0] + max(float(prev[2]), 1e-6) if prev is not None else 0
    while prev is not None and (count is None or made < count) and t0 + made / fps < last_shown - 1e-9:
        yield prev[1]  # targets inside the last frame's display time
        made += 1
    if count is not None and made < count:
        raise Reject(f"only {made} frames at {fps:g} fps; {count} needed")


def to_rgb(frame: av.VideoFrame, width: int, height: int, fmt: str = "rgb24") -> np.ndarray:
    """The frame as displayed, scaled to width x height (swscale, area-averaging when shrinking): rotated by its
    display matrix, converted by its own colour matrix and range."""
    quarter = _rotation(frame) % 180 == 90
    w, h = (height, width) if quarter else (width, height)
    same = (w, h) == (frame.width, frame.height)  # a conversion only: swscale's default, as to_ndarray does
    scaler = None if same else "AREA" if w * h < frame.width * frame.height else "BICUBIC"
    out = frame.reformat(width=w, height=h, format=fmt, interpolation=scaler,
                         src_color_range=frame.color_range or None).to_ndarray()
    return np.rot90(out, _rotation(frame) // 90) if _rotation(frame) else out


def transform(frame: av.VideoFrame, g: Geometry) -> np.ndarray:
    """Scale the displayed frame (square pixels: the stretch of an anamorphic one is in the scale) and center-crop
    it to RGB [height, width, 3]."""
    rgb = to_rgb(frame, g.scaled_w, g.scaled_h)
    return np.ascontiguousarray(rgb[g.top:g.top + g.height, g.left:g.left + g.width])


def read_frames(path) -> np.ndarray:
    """Every frame of a video as displayed, RGB uint8 [F, H, W, 3] (`decoded`: PyAV, decord as the fallback)."""
    info, sar = stream_info(path, None)
    frames = [to_rgb(f, *display_size(f, sar)) for _, f in decoded(path, info.get("stream"))]
    if not frames:
        raise Reject(f"{path}: no decodable video frames")
    return np.stack(frames)
