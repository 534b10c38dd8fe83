"""Video I/O for the stages: metadata (decord, PyAV as the fallback), frames with their timestamps,
16 fps resampling by timestamps, cover-scale + center-crop geometry; H.264 encoding (PyAV, libx264) comes
from megatron_wan.video_io, which the sampler shares."""

import math
import os
from dataclasses import dataclass

import av
import numpy as np

from data_tools.stage import Reject
from megatron_wan.data.shards import file_sha256
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


def _decord_metadata(path) -> dict:
    import decord

    vr = decord.VideoReader(str(path), num_threads=1)
    frames = len(vr)
    if frames == 0:
        raise Reject("no video frames")
    height, width = vr[0].shape[:2]
    vr[frames - 1]  # decoding the last frame catches a file cut short
    return {"fps": float(vr.get_avg_fps()), "frames": frames, "width": int(width), "height": int(height),
            "probe_backend": "decord"}


def _pyav_metadata(path) -> dict:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise Reject("no video stream")
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))  # counts what really decodes
        if frames == 0:
            raise Reject("no decodable video frames")
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        return {"fps": fps, "frames": frames, "width": stream.width, "height": stream.height,
                "probe_backend": "pyav"}


def _codec(path) -> str:
    try:
        with av.open(str(path)) as container:
            return container.streams.video[0].codec_context.name
    except (av.FFmpegError, IndexError):
        return "unknown"


def video_metadata(path) -> dict:
    """fps, frames, duration, width, height, aspect, codec, file size and SHA-256 of a video file.

    Raises Reject for an empty, unreadable, truncated or non-video file, with decord's and PyAV's reasons.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise Reject("empty file (0 bytes)")
    try:
        meta = _decord_metadata(path)
    except Exception as first:  # decord raises its own error types; PyAV may still read it
        try:
            meta = _pyav_metadata(path)
        except Reject:
            raise
        except Exception as second:
            raise Reject(f"not a readable video (decord: {str(first).splitlines()[0][:200]}; "
                         f"PyAV: {str(second).splitlines()[0][:200]})") from None
    if meta["fps"] <= 0:
        raise Reject("no frame rate in the stream")
    meta.update(duration=meta["frames"] / meta["fps"], aspect=meta["width"] / meta["height"], codec=_codec(path),
                size_bytes=size, sha256=file_sha256(path))
    return meta


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


def bucket_size(aspect: str, min_side: int) -> tuple[int, int]:
    """Output (width, height) of a bucket: the short side min_side, both sides multiples of 16."""
    a, b = ASPECTS[aspect]
    short = math.ceil(min_side / 16) * 16
    long = max(short, round(short * max(a, b) / min(a, b) / 16) * 16)
    return (long, short) if a >= b else (short, long)


def cover_geometry(src_w: int, src_h: int, width: int, height: int) -> Geometry:
    """Scale a src_w x src_h frame to cover width x height (aspect kept), then crop its center."""
    s = max(width / src_w, height / src_h)
    sw, sh = max(width, round(src_w * s)), max(height, round(src_h * s))
    return Geometry(width, height, sw, sh, (sw - width) // 2, (sh - height) // 2)


def resampled_frames(path, fps: float, count: int):
    """Yield `count` RGB frames [H, W, 3] uint8 at `fps`, each the source frame nearest in time to
    t0 + i/fps (by presentation timestamps, so variable frame rates resample right). Raises Reject
    when the video ends first."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_fps = float(stream.average_rate or stream.guessed_rate or fps)
        made, t0, prev = 0, None, None
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else (0 if prev is None else prev[0] + 1 / src_fps)
            t0 = t if t0 is None else t0
            while made < count and t >= t0 + made / fps - 1e-9:
                target = t0 + made / fps
                use_prev = prev is not None and target - prev[0] <= t - target
                yield prev[1] if use_prev else frame
                made += 1
            if made == count:
                return
            prev = (t, frame)
        while prev is not None and made < count and t0 + made / fps < prev[0] + 1 / src_fps - 1e-9:
            yield prev[1]  # targets inside the last frame's display time
            made += 1
    if made < count:
        raise Reject(f"only {made} frames at {fps:g} fps; {count} needed")


def transform(frame: av.VideoFrame, g: Geometry) -> np.ndarray:
    """Scale (swscale, area-averaging when shrinking) and center-crop to RGB [height, width, 3]."""
    shrink = g.scaled_w < frame.width
    rgb = frame.reformat(width=g.scaled_w, height=g.scaled_h, format="rgb24",
                         interpolation="AREA" if shrink else "BICUBIC").to_ndarray()
    return np.ascontiguousarray(rgb[g.top:g.top + g.height, g.left:g.left + g.width])


def read_frames(path) -> np.ndarray:
    """Every frame of a video as RGB uint8 [F, H, W, 3] (decord; PyAV when decord cannot read it)."""
    try:
        import decord

        vr = decord.VideoReader(str(path), num_threads=1)
        return vr.get_batch(list(range(len(vr)))).asnumpy()
    except Exception:  # decord raises its own error types; PyAV may still read it
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        if not frames:
            raise Reject(f"{path}: no decodable video frames") from None
        return np.stack(frames)
