"""Pair execution and objective cost, measured in one run on one config.

    python -m megatron_wan.bench.pair_modes [--preset tiny] [--layers 2] [--grid 4 8 8] [--pairs 2]

Prints, as ratios: activation bytes saved for backward (peak) and step time of `sequential` vs
`batched`, and the Reg-DPO step (batched, frozen reference copy) vs an SFT step on the winners
(theory: 8/3 = policy forward+backward on 2B samples plus a reference forward on 2B, over
forward+backward on B; a backward costs about two forwards).
"""

import argparse
import json

import torch

from megatron_wan import parallel
from megatron_wan.bench.meters import SavedTensorMeter
from megatron_wan.models.wan21 import WanModel, preset
from megatron_wan.objectives.flow_matching import FlowMatching
from megatron_wan.objectives.pair_step import Conditions, PairBatch, PairObjective
from megatron_wan.objectives.reference import make_reference
from megatron_wan.throughput import time_it


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--grid", type=int, nargs=3, default=(4, 16, 16), help="latent frames, height, width")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    parallel.initialize()
    device = parallel.default_device()
    torch.manual_seed(0)
    cfg = preset(args.preset, num_layers=args.layers)
    model = WanModel(cfg).to(device)
    reference = make_reference("copy", model)
    n, shape = args.pairs, (args.pairs, cfg.out_dim, *args.grid)
    cond = torch.randn(n, cfg.in_dim - cfg.out_dim, *args.grid, device=device) if cfg.is_i2v else None
    clip = torch.randn(n, 257, cfg.image_dim, device=device) if cfg.has_image_tokens else None
    text = torch.randn(n, 16, cfg.text_dim, device=device)
    batch = PairBatch(torch.randn(shape, device=device), torch.randn(shape, device=device),
                      Conditions(text, clip, cond), list(range(n)))
    flow = FlowMatching()
    params = list(model.parameters())

    def run(mode, pair_mode):
        objective = PairObjective(flow, mode=mode, pair_mode=pair_mode)

        def step():
            model.zero_grad(set_to_none=True)
            objective.step(model, reference, batch, step=0)

        meter = SavedTensorMeter(exclude=params)
        with meter:
            step()
        return meter.peak, time_it(step, repeats=args.repeats)

    results = {
        "batched": run("regdpo", "batched"),
        "sequential": run("regdpo", "sequential"),
        "sft": run("sft", "batched"),
    }
    (mem_b, t_b), (mem_s, t_s), (_, t_sft) = results["batched"], results["sequential"], results["sft"]
    tokens = args.grid[0] * args.grid[1] * args.grid[2] // (cfg.patch_size[1] * cfg.patch_size[2])
    print(f"config: {args.preset}, {args.layers} layers, {n} pairs of {tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'run':<24}{'peak saved MiB':>16}{'step s':>10}")
    for name, (mem, t) in results.items():
        print(f"{name:<24}{mem / 2**20:>16.2f}{t:>10.3f}")
    summary = {
        "sequential_vs_batched_saved_bytes": mem_s / mem_b,
        "sequential_vs_batched_step_time": t_s / t_b,
        "regdpo_vs_sft_step_time": t_b / t_sft,
        "regdpo_vs_sft_theory": 8 / 3,
    }
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
