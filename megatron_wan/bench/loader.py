"""Step time with the DataLoader's workers vs reading inline, on a shard of 720p-sized latents, measured in one run.

    python -m megatron_wan.bench loader [--pairs 12] [--steps 8] [--workers 2] [--prefetch 2] [--compute-ms 300]
                                        [--repeats 3] [--dir DIR]

The data is a T2V encoded dataset of `--pairs` pairs of random float32 latents [16, 21, 90, 160] (Wan 2.1's VAE at
1280x720, 81 frames: 19.4 MB a video, two a pair) in `data_tools encode`'s layout (bench.sweep.write_dataset).
A step is what the trainer does around its data: take the next batch from PairLoader (data.num_workers=0: read on
the main thread; else read ahead by the workers), move it to the device with `to_pair_batch` (pinned memory and
non-blocking copies on CUDA), then a stand-in for forward + backward: matmuls on the device, calibrated once to
last `--compute-ms` (the time the main thread waits on the model in a real step). Before every pass the shard's
pages are dropped from the page cache (posix_fadvise DONTNEED) so each pass reads the file from disk. Passes
alternate between the two settings; per pass the mean step time of the steps after the first (worker start-up and
the first read excluded); a third pass times the inline reads alone. Printed: the median of each and the ratio
inline / loader.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_wan.bench.sweep import write_dataset
from megatron_wan.data.datasets import PairDataset
from megatron_wan.data.loader import PairLoader, to_pair_batch
from megatron_wan.data.samplers import BucketBatchSampler

GRID_720P = (21, 90, 160)  # latent frames, height, width of 81 frames at 1280x720


class StandIn:
    """Device matmuls lasting about `seconds` (calibrated once): the model's share of a step."""

    def __init__(self, seconds: float, device, n: int = 1024):
        self.device = device
        self.a = torch.randn(n, n, device=device)
        self.reps = 1
        start = time.perf_counter()
        self._run(8)
        per = (time.perf_counter() - start) / 8
        self.reps = max(1, round(seconds / per))

    def _run(self, reps):
        x = self.a
        for _ in range(reps):
            x = torch.tanh(x @ self.a)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return x

    def __call__(self):
        return self._run(self.reps)


def _drop_page_cache(directory: Path) -> None:
    for path in directory.glob("*.bin"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _pass(data: Path, workers: int, prefetch: int, steps: int, work: StandIn | None, device) -> float:
    """Mean step time of steps 2..`steps` of one pass, from a cold page cache (`work` None: the reads alone)."""
    _drop_page_cache(data)
    dataset = PairDataset(data, text_len=64)
    loader = PairLoader(dataset, BucketBatchSampler(dataset.shapes, 1, seed=0), num_workers=workers,
                        prefetch=prefetch, pin_memory=device.type == "cuda")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch = to_pair_batch(next(loader), device, non_blocking=device.type == "cuda")
        if work is not None:
            work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del batch
    del loader  # shuts the workers down
    return statistics.mean(times[1:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=8, help="steps per pass (the first is not timed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--compute-ms", type=float, default=300.0, help="the stand-in model time of a step")
    ap.add_argument("--repeats", type=int, default=3, help="passes per setting, alternating")
    ap.add_argument("--dir", default=None, help="where to write the temporary dataset (default: the system's)")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.pairs < args.steps:
        raise SystemExit("--steps must be >= 2 and at most --pairs (one epoch, every read from disk)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = StandIn(args.compute_ms / 1e3, device)
    with tempfile.TemporaryDirectory(prefix="loader_bench_", dir=args.dir) as root:
        data = write_dataset(Path(root) / "data", GRID_720P, pairs=args.pairs)
        mb = sum(p.stat().st_size for p in data.glob("*.bin")) / args.pairs / 1e6
        inline, loader, reads = [], [], []
        for _ in range(args.repeats):  # alternate, so that drift in the machine hits all alike
            inline.append(_pass(data, 0, args.prefetch, args.steps, work, device))
            loader.append(_pass(data, args.workers, args.prefetch, args.steps, work, device))
            reads.append(_pass(data, 0, args.prefetch, args.steps, None, device))
    t_inline, t_loader, t_read = statistics.median(inline), statistics.median(loader), statistics.median(reads)
    summary = {"device": device.type, "latent": [16, *GRID_720P], "mb_per_pair": mb, "compute_ms": args.compute_ms,
               "workers": args.workers, "prefetch": args.prefetch, "read_s": t_read, "step_s_inline": t_inline,
               "step_s_loader": t_loader, "inline_over_loader": t_inline / t_loader}
    print(f"loader: {mb:.1f} MB a pair of 720p latents read cold, stand-in model {args.compute_ms:.0f} ms on "
          f"{device.type}: step {t_inline * 1e3:.0f} ms inline, {t_loader * 1e3:.0f} ms with {args.workers} workers "
          f"x prefetch {args.prefetch}: ratio {t_inline / t_loader:.2f} (reading alone {t_read * 1e3:.0f} ms a "
          f"step; median of {args.repeats} passes each)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
