"""Exact bytes per rank of parameters, gradients and optimizer state under FSDP2 at run.dp_shard 1 / 2 / 4.

    python -m megatron_wan.bench fsdp_memory [--world 4] [--finetune full] [--preset tiny]

The Megatron engine around the preset's WanModel on WORLD local processes (gloo on CPU): one forward and backward
of a random batch, then the optimizer step. Bytes are the sums of the local shards' sizes on each rank (a
DTensor's `to_local()`, exact, not timed): parameters (trainable and frozen), gradients (after the backward's
reduction, before the step) and AdamW's state (after the step); the largest rank is reported, with its ratio to
dp_shard 1. Prints a table and returns the rows.
"""

import argparse

import torch

from megatron_wan.parallel.local import run_local
from megatron_wan.parallel.parallelize import local_bytes

PARTS = ("parameters", "gradients", "optimizer")


def state_bytes(engine, gradients: bool = True) -> dict:
    """Bytes this rank holds of the engine's parameters, gradients (when present) and optimizer state."""
    optim = [t for s in engine.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out = {"parameters": local_bytes(engine.module.parameters()), "optimizer": local_bytes(optim),
           "gradients": local_bytes(p.grad for p in engine.params if p.grad is not None) if gradients else 0}
    out["total"] = sum(out[k] for k in PARTS)
    return out


def _measure(shards, finetune: str, preset_name: str) -> list[dict]:
    from megatron_wan import parallel
    from megatron_wan.config import load_config
    from megatron_wan.engines.megatron import MegatronEngine
    from megatron_wan.models.wan21 import WanModel, preset
    from megatron_wan.models.wan21.lora import apply_lora

    parallel.initialize()
    rows = []
    for dp_shard in shards:
        lora = ["lora=null"] if finetune == "full" else ["lora.rank=4"]
        cfg = load_config(None, [f"run.finetune={finetune}", *lora, "run.dtype=fp32", f"run.dp_shard={dp_shard}",
                                 "objective.reference=copy"])
        torch.manual_seed(0)
        model = WanModel(preset(preset_name))
        if finetune == "lora":
            apply_lora(model, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets))
        engine = MegatronEngine(cfg, model)
        wan = model.wan
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, wan.in_dim, 1, 4, 4, generator=g)
        out = engine.model(x, torch.tensor([500.0]), torch.randn(1, 8, wan.text_dim, generator=g),
                           torch.randn(1, 257, wan.image_dim, generator=g) if wan.has_image_tokens else None)
        engine.begin_step(1)
        engine.backward(out.square().mean())
        grads = state_bytes(engine)["gradients"]
        engine.step(1e-4)
        found = {**state_bytes(engine, gradients=False), "gradients": grads}
        found["total"] = sum(found[k] for k in PARTS)
        rows.append({"dp_shard": dp_shard, **found})
    return rows


def measure(world: int = 4, shards=(1, 2, 4), finetune: str = "full", preset_name: str = "tiny") -> list[dict]:
    """Per dp_shard: the largest rank's bytes of each part and in total, and the total's ratio to the first."""
    per_rank = run_local(_measure, world, list(shards), finetune, preset_name, env={"OMP_NUM_THREADS": "1"})
    rows = []
    for i, dp_shard in enumerate(shards):
        row = {"dp_shard": dp_shard, **{k: max(r[i][k] for r in per_rank) for k in (*PARTS, "total")}}
        rows.append(row)
    for row in rows:
        row["ratio"] = row["total"] / rows[0]["total"]
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m megatron_wan.bench fsdp_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--finetune", choices=("full", "lora"), default="full")
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args(argv)
    shards = [s for s in (1, 2, 4, 8) if s <= args.world and args.world % s == 0]
    rows = measure(args.world, shards, args.finetune, args.preset)
    print(f"{args.preset}, {args.finetune} fine-tune, fp32, AdamW, {args.world} ranks: bytes on the largest rank")
    print("| dp_shard | parameters | gradients | optimizer | total | x dp_shard 1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dp_shard']} | {r['parameters']} | {r['gradients']} | {r['optimizer']} | {r['total']} | "
              f"{r['ratio']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
