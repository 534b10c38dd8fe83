"""Videos: RGB frames to an H.264 MP4 (PyAV, libx264), for the sampler and the data stages, and back."""

import av
import numpy as np

BT709 = 1  # AVCOL_SPC_BT709 = AVCOL_PRI_BT709 = AVCOL_TRC_BT709
LIMITED = 1  # AVCOL_RANGE_MPEG


def encode_h264(path, frames, fps: int, crf: int, preset: str, threads: int = 0) -> int:
    """Encode RGB frames to an H.264 (yuv420p) MP4 at exactly `fps`, converted by the BT.709 matrix (limited range)
    and tagged so (primaries, transfer, matrix, range), as HD video is read; returns the frame count. `threads`: x264's
    (0: its own choice, which depends on the machine; 1 gives the same bytes everywhere)."""
    n = 0
    with av.open(str(path), "w", format="mp4") as out:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = out.add_stream("libx264", rate=fps)
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": preset, "threads": str(threads)}
                cc = stream.codec_context
                cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = BT709, BT709, BT709, LIMITED
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            frame.pts = n
            out.mux(stream.encode(frame))
            n += 1
        if stream is not None:
            out.mux(stream.encode())
    return n


def read_rgb(path) -> np.ndarray:
    """Every frame of the first video stream as RGB uint8 [T, H, W, 3], converted by the stream's own colour matrix
    and range (as stored: no rotation or sample-aspect stretch; data_tools.media reads arbitrary videos as shown).
    A ValueError names a file with no decodable frames."""
    with av.open(str(path)) as container:
        frames = [f.reformat(format="rgb24", src_color_range=f.color_range or None).to_ndarray()
                  for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no decodable video frames")
    return np.stack(frames)
