"""MFU of a compute-bound step, ours vs diffusers' WanTransformer3DModel, in fp32 and bf16 autocast, in one run.

    python -m megatron_wan.bench mfu [--dim 1024 --heads 8 --ffn 4096 --layers 2] [--grid 4 32 32]
        [--text-len 512] [--rounds 5] [--dtypes fp32 bf16] [--out outputs/bench/mfu]

One T2V config (head dim 128 at the defaults; 1,024 video tokens from the latent grid 4 x 32 x 32, 512 text tokens),
the same weights in both models, one sample. Timed per dtype, interleaved in rounds after one warmup round:
- matmul: the device's peak. On CPU a 1024^3 matmul in the dtype timed in this process (throughput.peak_flops), on a
  GPU the table value;
- diffusers: forward + backward of WanTransformer3DModel (loss: mean square of the output);
- ours: the same with our WanModel;
- regdpo: a whole Reg-DPO training step of the training stack: batched pair (winner and loser in one forward), the
  frozen reference (a copy) on both, the loss, the backward and the Megatron engine's optimizer step (full
  fine-tuning, AdamW).
bf16 runs under torch.autocast with fp32 weights, as training does; the backward runs inside the autocast region.
FLOPs come from the model's parameter description (models.parameters; matrix products only: patch embedding,
attention projections and cores with their sequence lengths, cross-attention, MLP, head): 3 forwards for a forward +
backward, and for the Reg-DPO step 3 x 2 policy forwards + 2 reference forwards. The machine is shared and noisy, so
each figure is the best of the rounds (the fastest time, the highest peak); MFU = FLOPs / time / peak. Ours vs
diffusers is also given paired: the median over rounds of their two times in the same round (who goes first
alternates), which a drift of the machine hits alike.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from megatron_wan import parallel
from megatron_wan.dtypes import DTYPES, TRAINING
from megatron_wan.models.wan21 import SPEC, WanConfig, WanModel
from megatron_wan.throughput import peak_flops, step_flops, time_it


def _models(cfg: WanConfig, device):
    """(diffusers' model, ours with the same weights), fp32 on `device`."""
    from diffusers import WanTransformer3DModel

    from megatron_wan.models.wan21.adapter import config_to_diffusers

    torch.manual_seed(0)
    theirs = WanTransformer3DModel(**config_to_diffusers(cfg)).float()
    ours = WanModel.from_diffusers(theirs, attention_backend=cfg.attention_backend)
    return theirs.to(device), ours.to(device)


def _regdpo_step(ours: WanModel, inputs, dtype: str, compile_mode: str | None = None):
    """A closure running one Reg-DPO step of the training stack on a pair built from `inputs` (it trains `ours`, which
    the engine wraps) with `run.dtype` = `dtype` (bf16: FSDP2 computes in bf16 but the parameters diffusers keeps in
    fp32, as the trainer does); with `compile_mode`, the policy's and the reference's blocks compiled as the Trainer
    does (model.compile)."""
    from megatron_wan.compile import compile_blocks
    from megatron_wan.config import Config, ObjectiveConfig, RunConfig
    from megatron_wan.engines import build_engine
    from megatron_wan.objectives.flow_matching import FlowMatching
    from megatron_wan.objectives.pair_step import Conditions, PairBatch, PairObjective
    from megatron_wan.objectives.reference import make_reference

    x, _, text = inputs
    cfg = Config(run=RunConfig(finetune="full", dtype=dtype), lora=None, objective=ObjectiveConfig(reference="copy"))
    reference = make_reference("copy", ours)
    if compile_mode:
        compile_blocks(ours, compile_mode)
        compile_blocks(reference.model, compile_mode)
    engine = build_engine(cfg, ours)
    objective = PairObjective(FlowMatching(), "regdpo", pair_mode="batched")
    batch = PairBatch(x, torch.randn_like(x), Conditions(text), [0])
    state = {"step": 0}

    def step():
        objective.step(engine.model, reference, batch, state["step"], backward=engine.backward)
        engine.step(cfg.optim.lr)
        state["step"] += 1

    return step


def _forward_backward(model, inputs, diffusers: bool):
    x, t, text = inputs

    def step():
        out = model(x, t, text, return_dict=False)[0] if diffusers else model(x, t, text)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def _profile(step, device, rows: int = 12) -> str:
    """torch.profiler's table of one call of `step` (warm): the ops taking the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def measure(cfg: WanConfig, grid, text_len: int, dtypes, rounds: int, device=None, compiled: bool = False,
            mode: str = "default", profile: bool = False) -> dict:
    """{dtype: {name: {"seconds", "flops", "mfu"} for diffusers, ours, regdpo (and with `compiled`: ours_compiled,
    regdpo_compiled, and "compile": seconds and graphs of the warmup round); "peak": FLOP/s, "peak_source"}}."""
    from megatron_wan.compile import compile_blocks, compile_stats

    parallel.initialize()
    device = device or parallel.default_device()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, cfg.in_dim, *grid, generator=g).to(device), torch.tensor([500.0], device=device),
              torch.randn(1, text_len, cfg.text_dim, generator=g).to(device))
    theirs, ours = _models(cfg, device)
    description = SPEC.parameters(cfg)
    forward_backward = 3 * description.forward_flops(grid, text_len)["total"]
    regdpo = step_flops(description, grid, text_len, 1)["total"]
    def twin():  # ours again, with the same weights
        return WanModel.from_diffusers(theirs, attention_backend=cfg.attention_backend).to(device)

    work = {"diffusers": (_forward_backward(theirs, inputs, True), forward_backward),
            "ours": (_forward_backward(ours, inputs, False), forward_backward)}
    if compiled:  # the same weights, blocks compiled (the Reg-DPO step's reference copy is compiled too)
        work["ours_compiled"] = (_forward_backward(compile_blocks(twin(), mode), inputs, False), forward_backward)
    results = {}
    for name in dtypes:
        dtype = DTYPES[name]
        work["regdpo"] = (_regdpo_step(twin(), inputs, name), regdpo)  # its engine is built for this dtype
        if compiled:
            work["regdpo_compiled"] = (_regdpo_step(twin(), inputs, name, compile_mode=mode), regdpo)
        times = {k: [] for k in work}
        peak, source = 0.0, ""
        before = compile_stats()
        for r in range(rounds + 1):  # round 0 warms up (and compiles)
            p, source = peak_flops(dtype)
            peak = max(peak, p) if r else peak
            order = list(work) if r % 2 else list(reversed(work))  # who goes first alternates
            for key in order:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    seconds = time_it(work[key][0], repeats=1, warmup=0)
                if r:
                    times[key].append(seconds)
            if r == 0:
                after = compile_stats()
        paired = statistics.median(d / o for d, o in zip(times["diffusers"], times["ours"]))
        results[name] = {"peak": peak, "peak_source": source, "ours_vs_diffusers_paired": paired, **{
            key: {"seconds": min(times[key]), "flops": flops, "mfu": flops / min(times[key]) / peak}
            for key, (_, flops) in work.items()}}
        if compiled:
            results[name]["compile"] = {"seconds": after["seconds"] - before["seconds"],
                                        "graphs": after["graphs"] - before["graphs"],
                                        "recompiles_after_warmup": compile_stats()["recompiles"] - after["recompiles"]}
        if profile:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                results[name]["profile"] = {key: _profile(work[key][0], device)
                                            for key in ("regdpo", "regdpo_compiled") if key in work}
    return results


def table(results: dict) -> str:
    lines = ["| dtype | peak GFLOP/s | diffusers s | diffusers MFU | ours s | ours MFU | ours / diffusers (best) "
             "| ours / diffusers (paired) | Reg-DPO step s | Reg-DPO MFU |", "|---" * 10 + "|"]
    for name, r in results.items():
        d, o, s = r["diffusers"], r["ours"], r["regdpo"]
        lines.append(f"| {name} | {r['peak'] / 1e9:.1f} | {d['seconds']:.3f} | {d['mfu']:.3f} | {o['seconds']:.3f} "
                     f"| {o['mfu']:.3f} | {o['mfu'] / d['mfu']:.3f} | {r['ours_vs_diffusers_paired']:.3f} "
                     f"| {s['seconds']:.3f} | {s['mfu']:.3f} |")
    lines.append("")
    lines.append("best: MFU ratio of the fastest times; paired: the median over rounds of diffusers' time over ours "
                 "in the same round (> 1: ours faster)")
    if all("compile" in r for r in results.values()):
        lines += ["", "| dtype | compiled s | compiled MFU | compiled / eager | compiled / diffusers | Reg-DPO "
                  "compiled s | Reg-DPO compiled MFU | Reg-DPO compiled / eager | compile s | graphs | recompiles "
                  "after warmup |", "|---" * 12 + "|"]
        for name, r in results.items():
            d, o, c, s, sc, k = (r[key] for key in ("diffusers", "ours", "ours_compiled", "regdpo",
                                                    "regdpo_compiled", "compile"))
            lines.append(f"| {name} | {c['seconds']:.3f} | {c['mfu']:.3f} | {o['seconds'] / c['seconds']:.3f} "
                         f"| {d['seconds'] / c['seconds']:.3f} | {sc['seconds']:.3f} | {sc['mfu']:.3f} "
                         f"| {s['seconds'] / sc['seconds']:.3f} | {k['seconds']:.1f} | {k['graphs']} "
                         f"| {k['recompiles_after_warmup']} |")
        lines.append("")
        lines.append("compiled: model.compile (each block's forward by torch.compile); x / y: y's speed-up over x "
                     "(best times); compile s and graphs: the warmup round's, every compiled model of that dtype")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m megatron_wan.bench mfu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--text-dim", type=int, default=4096)
    ap.add_argument("--grid", type=int, nargs=3, default=(4, 32, 32), help="latent frames, height, width")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after the warmup round")
    ap.add_argument("--dtypes", nargs="+", choices=TRAINING, default=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also the same model with model.compile (and its "
                    "Reg-DPO step)")
    ap.add_argument("--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"))
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top ops of the (compiled) Reg-DPO step")
    ap.add_argument("--out", default="outputs/bench/mfu")
    args = ap.parse_args(argv)
    cfg = WanConfig(dim=args.dim, num_heads=args.heads, ffn_dim=args.ffn, num_layers=args.layers,
                    text_dim=args.text_dim, attention_backend="auto")
    started, load = time.perf_counter(), os.getloadavg()[0]
    results = measure(cfg, args.grid, args.text_len, args.dtypes, args.rounds, compiled=args.compile,
                      mode=args.compile_mode, profile=args.profile)
    peaks = "; ".join(f"{r['peak_source']}" for r in results.values())
    tokens = SPEC.parameters(cfg).video_tokens(args.grid)
    title = (f"dim {cfg.dim}, {cfg.num_heads} heads (head dim {cfg.head_dim}), ffn {cfg.ffn_dim}, "
             f"{cfg.num_layers} layers, {tokens} video + {args.text_len} text tokens, "
             f"batch 1 (Reg-DPO: 1 pair); best of {args.rounds} rounds; peak: {peaks}; {torch.get_num_threads()} "
             f"threads, load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    text = f"# MFU, one run\n\n{title}\n\n{table(results)}\n"
    for name, r in results.items():
        for key, ops in r.get("profile", {}).items():
            text += f"\n## {key}, {name}: top ops (torch.profiler, one warm step)\n\n```\n{ops}\n```\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mfu.md").write_text(text)
    (out / "mfu.json").write_text(json.dumps({"title": title, "results": results}, indent=1))
    print(text)
    print(f"mfu: {time.perf_counter() - started:.0f} s -> {out / 'mfu.md'}")
    return results


if __name__ == "__main__":
    main()
