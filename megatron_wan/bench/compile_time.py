"""Compile time of one Wan block under model.compile, at a real preset and grid.

    python -m megatron_wan.bench compile_time [--preset wan2.1-t2v-1.3b] [--grid 21 60 104] [--text-len 512]
        [--backward] [--mode default] [--dtype fp32]

Builds the preset with one block (random weights), turns a latent of the grid into its tokens, text context and
modulation, compiles the block (megatron_wan.compile.compile_blocks) and calls it once: forward under no_grad, or
with --backward forward + backward (the training graphs). Prints the seconds torch spent compiling (dynamo's own
compile-time metrics: tracing, AOTAutograd, Inductor's code generation and C++ / Triton compilation, without
running the kernels), the graphs compiled, and the first call's wall time, which adds one execution. 480p is the
default grid: 81 frames at 480 x 832 -> latent 21 x 60 x 104 -> 32,760 tokens. Regional compilation compiles one
block's graph for every block of the model, so this is the model's compile time too (per bucket shape and
variant: grad / no grad).
"""

import argparse
import time

import torch

from megatron_wan import parallel
from megatron_wan.compile import MODES, compile_blocks, compile_stats
from megatron_wan.models.wan21 import WanModel, preset
from megatron_wan.models.wan21.rope import rope_cos_sin

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(preset_name: str, grid, text_len: int, backward: bool, mode: str, dtype: str) -> dict:
    """{"compile_s", "graphs", "first_call_s", "tokens"} of one block of `preset_name` at latent `grid`."""
    parallel.initialize()
    device = parallel.default_device()
    torch.manual_seed(0)
    model = WanModel(preset(preset_name, num_layers=1, attention_backend="sdpa")).to(device)
    cfg = model.wan
    x = torch.randn(1, cfg.in_dim, *grid, device=device)
    with torch.no_grad():
        tokens = model.patchify(x)
        _, t_mod, context, image = model.conditions(torch.tensor([500.0], device=device),
                                                    torch.randn(1, text_len, cfg.text_dim, device=device))
    rope = rope_cos_sin(model.token_grid(x), cfg.head_dim, cfg.rope_theta, device=device)
    block = compile_blocks(model, mode).blocks[0]
    before = compile_stats()
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"), torch.set_grad_enabled(backward):
        out = block(tokens.requires_grad_(backward), context, image, t_mod, rope)
        if backward:
            out.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - started
    after = compile_stats()
    return {"compile_s": after["seconds"] - before["seconds"], "graphs": after["graphs"] - before["graphs"],
            "first_call_s": first, "tokens": tokens.shape[0]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m megatron_wan.bench compile_time", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--grid", type=int, nargs=3, default=(21, 60, 104), help="latent frames, height, width")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--backward", action="store_true", help="forward + backward (training) instead of a forward")
    ap.add_argument("--mode", default="default", choices=MODES)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    r = measure(args.preset, args.grid, args.text_len, args.backward, args.mode, args.dtype)
    what = "forward + backward" if args.backward else "forward (no grad)"
    print(f"compile_time: {args.preset}, one block, latent {list(args.grid)} = {r['tokens']} tokens + "
          f"{args.text_len} text, {what}, {args.dtype}, mode {args.mode}, {torch.get_num_threads()} threads: "
          f"compiled in {r['compile_s']:.1f} s ({r['graphs']} graph(s)); first call {r['first_call_s']:.1f} s "
          f"(compile + one execution)")
    return r


if __name__ == "__main__":
    main()
