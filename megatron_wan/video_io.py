"""Writing videos: RGB frames to an H.264 MP4 (PyAV, libx264), for the sampler and the data stages."""

import av

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
