"""Activation memory per rank under context parallelism, and ring vs Ulysses step time, in one run.

    python -m megatron_wan.bench.activation_memory [--preset tiny] [--layers 2] [--grid 16 48 48]
        [--text-len 512] [--cp 1 2 4] [--repeats 3]

For each CP size, that many local processes (gloo) run one training forward and backward of one
sample (the local shard's prediction and the whole-video error, as the objectives do) and count the
bytes autograd saves for backward (exact: saved_tensors_hooks, parameters excluded). Printed: the
peak per rank (the largest rank) and its ratio to CP=1. Then, at CP=2, the step time of `ring` and
`ulysses` on the same processes, alternating, and their ratio. Text tokens (Wan's 512) stay whole on
every rank, so the ratio approaches 1/CP as the video grows.
"""

import argparse
import json
import os

import torch

from megatron_wan import parallel
from megatron_wan.bench.meters import SavedTensorMeter
from megatron_wan.models.wan21 import WanModel, preset
from megatron_wan.objectives.flow_matching import per_sample_error
from megatron_wan.parallel.local import run_local
from megatron_wan.throughput import time_it


def _sample(cfg, grid, text_len, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, *grid, generator=g)
    target = torch.randn(1, cfg.out_dim, *grid, generator=g)
    text = torch.randn(1, text_len, cfg.text_dim, generator=g)
    clip = torch.randn(1, 257, cfg.image_dim, generator=g) if cfg.has_image_tokens else None
    return tuple(None if t is None else t.to(device) for t in (x, torch.tensor([500.0]), text, clip, target))


def _train_step(model, sample):
    x, t, text, clip, target = sample
    pred, shard = model(x, t, text, clip, gather_output=False)
    per_sample_error(pred, target, shard).sum().backward()


def _setup(cp, args):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    parallel.initialize(context_parallel=cp)
    cfg = preset(args.preset, num_layers=args.layers)
    return cfg, _sample(cfg, args.grid, args.text_len, parallel.default_device())


def _saved_bytes(cp, args):
    cfg, sample = _setup(cp, args)
    model = WanModel(cfg.replace(cp_comm="ring")).to(parallel.default_device())
    with SavedTensorMeter(exclude=list(model.parameters())) as meter:
        _train_step(model, sample)
    return meter.peak


def _step_times(args):
    cfg, sample = _setup(2, args)
    models = {comm: WanModel(cfg.replace(cp_comm=comm)).to(parallel.default_device()) for comm in ("ring", "ulysses")}
    times = {comm: [] for comm in models}
    for _ in range(args.repeats):  # alternate, so drifts of the machine hit both alike
        for comm, model in models.items():
            times[comm].append(time_it(lambda m=model: _train_step(m, sample), repeats=1, warmup=0))
    return {comm: sorted(ts)[len(ts) // 2] for comm, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--grid", type=int, nargs=3, default=(16, 48, 48), help="latent frames, height, width")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--cp", type=int, nargs="+", default=(1, 2, 4))
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per cp_comm (0: skip the timing)")
    args = ap.parse_args(argv)
    cfg = preset(args.preset, num_layers=args.layers)
    tokens = (args.grid[0] // cfg.patch_size[0]) * (args.grid[1] // cfg.patch_size[1]) * (
        args.grid[2] // cfg.patch_size[2])
    print(f"config: {args.preset}, {args.layers} layers, dim {cfg.dim}, {tokens} video tokens, "
          f"{args.text_len} text tokens, batch 1, fp32")

    peaks = {cp: max(run_local(_saved_bytes, cp, cp, args)) for cp in args.cp}
    base = peaks[min(args.cp)]
    print(f"{'CP':>4}{'saved MiB per rank':>22}{'ratio':>8}")
    summary = {}
    for cp, peak in peaks.items():
        print(f"{cp:>4}{peak / 2**20:>22.2f}{peak / base:>8.3f}")
        summary[f"saved_bytes_cp{cp}"] = peak
        summary[f"saved_ratio_cp{cp}"] = peak / base
    if args.repeats:
        times = run_local(_step_times, 2, args)
        ring, ulysses = (max(t[comm] for t in times) for comm in ("ring", "ulysses"))
        print(f"CP=2 step (forward + backward): ring {ring:.3f} s, ulysses {ulysses:.3f} s")
        summary.update(ring_step_s=ring, ulysses_step_s=ulysses, ring_vs_ulysses_step_time=ring / ulysses)
        print(f"ring_vs_ulysses_step_time: {ring / ulysses:.3f}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
