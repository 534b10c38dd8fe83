"""Device memory at start-up, before the engine shards anything, from the model family's parameter description
(models.parameters): what the trainer refuses before loading, and what the planner (megatron_wan.bench.plan) counts.

The trainer builds the policy whole on every rank (its TP share): loaded megatron-core linears are allocated on the
GPU in fp32 and the rest moved there (`.to(device)`); with LoRA and bf16 the frozen base is then cast to bf16; then
the reference copy (`objective.reference: copy`) is taken on the device; only then does FSDP2 (or ZeRO-3) shard.
Wan 2.2's `model.expert: both` does all of it for two experts.
"""

from megatron_wan.models.parameters import Description

GIB = 2**30
FP32 = 4
BF16 = 2
RESERVE_GIB = 4.0  # CUDA context, NCCL and library workspaces, allocator slack


def local_parameters(count: dict, tp: int) -> float:
    """Parameters one TP rank holds of a model whose `Description.count` is `count`."""
    return count["total"] - count["split"] * (1 - 1 / tp)


def start_up_bytes(description: Description, *, finetune: str, lora_rank: int, reference: str, tp: int = 1,
                   experts: int = 1, base_bytes: int = BF16, targets=None, reserve_gib: float = RESERVE_GIB) -> dict:
    """Per-GPU bytes at start-up: "built" (the policy as built and moved, fp32), "policy" (as trained: LoRA's
    frozen base in `base_bytes`, fp32 adapters on `targets`), "reference" (the copy on the device), "reserve", and
    "total", the peak: the larger of built and policy + reference, plus the reserve."""
    count = description.count(0 if finetune == "full" else lora_rank, targets)
    local = local_parameters(count, tp)
    built = experts * local * FP32
    policy = built if finetune == "full" else experts * (local * base_bytes + count["lora"] / tp * FP32)
    out = {"built": built, "policy": policy, "reference": policy if reference == "copy" else 0,
           "reserve": reserve_gib * GIB}
    out = {name: int(v) for name, v in out.items()}
    out["total"] = max(out["built"], out["policy"] + out["reference"]) + out["reserve"]
    return out


def config_start_up_bytes(cfg) -> dict:
    """`start_up_bytes` of a run config (megatron_wan.config.Config), for the architecture of `model.preset`."""
    from megatron_wan.models import spec_for_preset

    spec = spec_for_preset(cfg.model.preset)
    lora = cfg.lora if cfg.run.finetune == "lora" else None
    return start_up_bytes(spec.parameters(spec.config(cfg.model.preset)), finetune=cfg.run.finetune,
                          lora_rank=lora.rank if lora else 0, targets=lora.targets if lora else None,
                          reference=cfg.objective.reference if cfg.objective.mode != "sft" else "none",
                          tp=cfg.run.tensor_parallel, experts=2 if cfg.model.expert == "both" else 1,
                          base_bytes=BF16 if cfg.run.dtype == "bf16" else FP32)


def check_start_up(cfg, device_bytes: int, device: str) -> None:
    """A ConfigError naming the keys to change when the start-up peak of `cfg` exceeds `device_bytes`, the memory
    of `device` (its name, for the message)."""
    from megatron_wan.config import ConfigError

    need = config_start_up_bytes(cfg)
    if need["total"] <= device_bytes:
        return
    keys = []
    if need["reference"]:
        ways = []
        if cfg.model.expert != "both":  # copy_offload streams one model
            ways.append("copy_offload keeps the copy in CPU memory")
        if cfg.run.finetune == "lora":
            ways.append("adapter needs none")
        elif cfg.model.expert == "both":
            ways.append("adapter, with run.finetune lora, needs none")
        keys.append(f"objective.reference ({', '.join(ways)})")
    if cfg.run.finetune == "full":
        keys.append("run.finetune (lora: a frozen bf16 base)")
    if cfg.model.expert == "both":
        keys.append("model.expert (one expert per run: high_noise or low_noise)")
    keys.append("run.tensor_parallel (each rank holds 1/TP of the split weights)")
    parts = ", ".join(f"{name} {need[name] / GIB:.1f}" for name in ("built", "policy", "reference", "reserve"))
    raise ConfigError(f"{cfg.model.preset} ({cfg.run.finetune}, reference {cfg.objective.reference}, "
                      f"tensor_parallel {cfg.run.tensor_parallel}"
                      + (", both experts" if cfg.model.expert == "both" else "")
                      + f") needs {need['total'] / GIB:.1f} GiB per GPU at start-up, before the engine shards "
                      f"(GiB: {parts}); {device} has {device_bytes / GIB:.1f} GiB. Change "
                      + "; ".join(keys))
