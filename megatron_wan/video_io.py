"""Writing videos: RGB frames to an H.264 MP4 (PyAV, libx264), for the sampler and the data stages."""

import av


def encode_h264(path, frames, fps: int, crf: int, preset: str) -> int:
    """Encode RGB frames to an H.264 (yuv420p) MP4 at exactly `fps`; returns the frame count."""
    n = 0
    with av.open(str(path), "w", format="mp4") as out:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = out.add_stream("libx264", rate=fps)
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": preset}
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = n
            out.mux(stream.encode(frame))
            n += 1
        if stream is not None:
            out.mux(stream.encode())
    return n
