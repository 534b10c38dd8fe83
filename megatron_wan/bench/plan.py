"""Memory and throughput planner for Reg-DPO training of the real Wan 2.1 presets on H100 / H200.

    python -m megatron_wan.bench.plan [--preset wan2.1-i2v-14b-720p] [--height 720 --width 1280]
        [--frames 200] [--gpus 8] [--tp 1] [--cp 4] [--engine megatron|deepspeed] [--dp-shard 1]
        [--finetune lora|full] [--reference adapter|copy|copy_offload] [--no-recompute]
        [--pair-mode batched|sequential|ranks] [--encoders pre|gpu] [--gpu h100|h200] [--mfu 0.4] [--json]

The defaults are the paper's case (Appendix A.2, A.7) as megatron_wan.train runs it: Wan2.1-I2V-14B-720P,
720x1280, pairs of 200-frame videos, 8 x H100 80GB, CP=4, LoRA r16, the frozen reference offloaded,
activation checkpointing, one member of a pair at a time. Printed for that setup, for it on our other
engine, for it with the parameters sharded over all GPUs (`--dp-shard -1`: FSDP2 with CP), and for two FSDP
baselines, our engine fully sharded without CP (and "FSDP alone", without A.2's other techniques either):
per-GPU memory, the longest video that fits, the capacity ratio over FSDP, and the step time at the given MFU.
Setups megatron_wan.train would reject are rejected (its config validation).

Per-GPU memory = weights + gradients + optimizer + reference + encoders + activations + buffers.
Activations are the bytes autograd saves for backward, written out tensor by tensor for this model
(`activation_bytes`; checked against SavedTensorMeter on tiny configs). The rest follows the engines:
megatron (FSDP2 over the DP x CP ranks, `run.dp_shard`: fp32 master weights (LoRA: the bf16 base and fp32
adapters), gradients and AdamW state divided over the shard group, `sharded_state_bytes`, checked against the
exact per-rank bytes of the engine on CPU; plus the bf16 copies gathered for compute: two blocks and the root's
embeddings and head; several backward passes per step keep unsharded fp32 gradients until the one reduction),
deepspeed (ZeRO-3 with parameters and optimizer offloaded to CPU: two gathered blocks on the GPU).
`buffers` (a runtime reserve, and the gradients alive while a block runs backward) is an assumption,
not measured here.
"""

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass

from megatron_wan.config import Config, LoraConfig, ModelConfig, ObjectiveConfig, RunConfig, validate
from megatron_wan.models import spec_for_preset
from megatron_wan.models.parameters import Description
from megatron_wan.models.wan21.config import WanConfig
from megatron_wan.models.wan21.params import CLIP_TOKENS, describe
from megatron_wan.throughput import DEVICE_PEAKS, step_flops

GIB = 2**30
FP32 = 4
BF16 = 2


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes, the total nvidia-smi reports
    peak_flops: float  # dense bf16 tensor-core FLOP/s


GPUS = {
    "h100": Gpu("H100 SXM 80GB", 81559 * 2**20, DEVICE_PEAKS["H100 SXM"][0]),
    "h200": Gpu("H200 SXM 141GB", 143771 * 2**20, DEVICE_PEAKS["H200 SXM"][0]),
}

# Frozen encoders when not pre-encoded (--encoders gpu): bf16 weights resident on every GPU.
UMT5_XXL_ENCODER_PARAMS = 256384 * 4096 + 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240)  # embedding, 24 gated layers
CLIP_VISUAL_PARAMS = 632_000_000  # ViT-H/14 image tower (I2V only)
VAE_PARAMS = 127_000_000  # Wan 2.1 VAE

ENGINES = ("megatron", "deepspeed")
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size (not set by our config)


def activation_bytes(cfg: WanConfig, grid, text_len: int, samples: int = 1, tp: int = 1, cp: int = 1,
                     dtype_bytes: int = BF16, recompute: bool = False, lora_rank: int = 0) -> dict:
    """Bytes saved for backward by one trained forward of `samples` samples of latent `grid` (a CP
    rank's frames), activations in `dtype_bytes`, TP-split where the model splits them.

    `lora_rank` > 0: the base is frozen and only adapters train, so autograd keeps less (nothing for
    the embeddings, no inputs of gates and norm scales, nothing of the first block's modulation).
    `cp` > 1 adds the copy of the ring attention's output that the output projection saves.
    Returned: "outside" (embeddings, head, loss), "rope" (RoPE cos/sin the blocks read), "blocks" (what
    all blocks keep until their backward: their saved tensors, or with `recompute` only their inputs),
    "recompute" (one block's saved tensors while it is recomputed during backward), "total". Norms,
    modulation and gates run in float32 as Wan does. Under `recompute` the checkpoints hold RoPE in
    their recompute closures and save the recomputed block through their own hooks: SavedTensorMeter
    then sees total - rope - recompute. Parameter-shaped copies (autocast casts) are not included.
    """
    a, d, dt, ft, ht, r = dtype_bytes, cfg.dim, cfg.dim // tp, cfg.ffn_dim // tp, cfg.num_heads // tp, lora_rank
    s, latents, frozen = describe(cfg).video_tokens(grid), math.prod(grid), lora_rank > 0
    per_token = ((3 if frozen else 7) * d * FP32  # norm inputs (full: also modulated norms, gated outputs)
                 + 3 * d * a  # inputs of self q/k/v, cross q, fc1
                 + (3 if frozen else 6) * dt * FP32  # q/k RMSNorm inputs (full: also their outputs)
                 + (6 + (cp > 1)) * dt * a  # self q, k, v, out; cross q, out
                 + 2 * ft * a + 8 * r * a  # GELU input, fc2 input; the adapters' rank-r activations
                 + 9 * FP32 + 2 * ht * FP32)  # LayerNorm mean/rstd, RMSNorm scales; log-sum-exp of both attentions
    per_key = (1 if frozen else 2) * dt * FP32 + 2 * dt * a + FP32 + 2 * r * a  # text token: k norm, k, v, adapters
    block = s * per_token + text_len * per_key + 8 * d * FP32  # and the modulation: 6 vectors, (1 + scale) twice
    if cfg.has_image_tokens:  # image attention out, its sum with the text's; CLIP keys (frozen: no norm of them kept)
        block += s * (2 * dt * a + ht * FP32) + CLIP_TOKENS * (2 * dt * a if frozen else per_key)
    outside = latents * cfg.out_dim * FP32 + s * (d * FP32 + 2 * FP32) + d * FP32  # loss residual, head norm
    if frozen:
        outside += text_len * d * a  # the text context the adapters read
    else:  # patch-embed input; head's modulated norm and linear input; text and time MLPs; CLIP MLP
        outside += (latents * cfg.in_dim * a + s * (d * FP32 + d * a) + text_len * (cfg.text_dim + 3 * d) * a
                    + (cfg.freq_dim + 4 * d) * a)
        if cfg.has_image_tokens:
            outside += CLIP_TOKENS * (cfg.image_dim * FP32 + 3 * cfg.image_dim * a + d * FP32 + d * a + 4 * FP32)
    first_block_input = s * (d * FP32 + 2 * FP32) + d * FP32 if frozen else 0  # needs no gradient: norm1 not kept
    if recompute:  # each checkpoint keeps its block's inputs: its tokens; the time projection, the contexts
        kept, working, outside = cfg.num_layers * s * d * a, block, outside + 6 * d * FP32
        outside += CLIP_TOKENS * d * a if frozen and cfg.has_image_tokens else 0  # (kept anyway without a frozen base)
    else:
        kept, working = cfg.num_layers * block - first_block_input, 0
    out = {"outside": outside, "blocks": kept, "recompute": working}
    out = {name: samples * v for name, v in out.items()}
    out["rope"] = s * cfg.head_dim * FP32  # one table for the whole batch
    out["total"] = sum(out.values())
    return out


def sharded_state_bytes(description: Description, finetune: str, lora_rank: int, shard: int, tp: int = 1,
                        base_bytes: int = BF16) -> dict:
    """Bytes per rank of the master weights, gradients and AdamW state (two moments and one fp32 step counter
    per parameter tensor) when FSDP2 shards them over `shard` ranks; a LoRA base (the model's default targets) is
    frozen in `base_bytes`. `description`: the model's parameters (ModelSpec.parameters of its config)."""
    count = description.count(0 if finetune == "full" else lora_rank)
    local = count["total"] - count["split"] * (1 - 1 / tp)
    if finetune == "full":
        trained, tensors = local, len(description.params)
        weights = local * FP32
    else:
        trained, tensors = count["lora"] / tp, 2 * len(description.adapted())  # A and B of each adapted linear
        weights = local * base_bytes + trained * FP32
    return {"weights": weights / shard, "grads": trained * FP32 / shard,
            "optimizer": trained * 2 * FP32 / shard + tensors * FP32}


@dataclass(frozen=True)
class Setup:
    """One training configuration; the defaults are the paper's case (Appendix A.2, A.7) as our trainer runs
    it: A.2's pair parallelism (winner and loser on two ranks) needs CP=1 in megatron_wan.train, so the
    pair runs `sequential`, which also holds one sample's activations at a time (for one more forward)."""

    preset: str = "wan2.1-i2v-14b-720p"
    height: int = 720
    width: int = 1280
    frames: int = 200
    gpus: int = 8
    tp: int = 1
    cp: int = 4
    engine: str = "megatron"  # "megatron", "deepspeed" (megatron_wan.engines)
    dp_shard: int = 1  # megatron: run.dp_shard (1 replicate, -1 all DP x CP ranks, a divisor: hybrid)
    finetune: str = "lora"
    lora_rank: int = 16
    reference: str = "copy_offload"
    recompute: bool = True
    pair_mode: str = "sequential"
    pairs: int = 1  # pairs per data-parallel rank per step (run.batch_size)
    expert: str | None = None  # Wan 2.2 A14B: model.expert; `both` holds both experts' weights and state
    text_len: int = 512
    encoders: str = "pre"  # "pre": pre-encoded shards; "gpu": umT5, CLIP and VAE resident
    gpu: str = "h100"
    mfu: float = 0.4  # fraction of peak the executed FLOPs run at
    reserve_gib: float = 4.0  # CUDA context, NCCL and library workspaces, allocator slack

    def __post_init__(self):
        checks = [
            (self.engine in ENGINES, f"engine: expected one of {ENGINES}"),
            (self.encoders in ("pre", "gpu"), "encoders: expected pre or gpu"),
            (self.gpu in GPUS, f"gpu: expected one of {list(GPUS)}"),
            (self.height % self.geometry().side_multiple == 0 and self.width % self.geometry().side_multiple == 0,
             f"height, width: must be multiples of {self.geometry().side_multiple}"),
            (self.frames >= 1, "frames: must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; found {self}")
        validate(self.trainer_config(), self.gpus)  # what megatron_wan.train would reject, rejected here

    def config(self) -> WanConfig:
        return spec_for_preset(self.preset).config(self.preset)

    def geometry(self):
        """The preset's latent geometry (its family's VAE strides and the DiT's patch)."""
        return spec_for_preset(self.preset).geometry(self.config())
    def description(self) -> Description:
        """The parameter description of this setup's model (its family's ModelSpec.parameters)."""
        return spec_for_preset(self.preset).parameters(self.config())

    def trainer_config(self) -> Config:
        """The run config of megatron_wan.train for this setup."""
        return Config(
            run=RunConfig(task=self.config().model_type, finetune=self.finetune, tensor_parallel=self.tp,
                          context_parallel=self.cp, batch_size=self.pairs, engine=self.engine,
                          dp_shard=self.dp_shard),
            model=ModelConfig(preset=self.preset, recompute=self.recompute, expert=self.expert),
            objective=ObjectiveConfig(pair_mode=self.pair_mode, reference=self.reference),
            lora=LoraConfig(rank=self.lora_rank) if self.finetune == "lora" else None,
        )

    def latent_grid(self) -> tuple[int, int, int]:
        """Latent grid of the whole video: frames 1 + 4k -> 1 + k (others round up), sides / the VAE's stride."""
        g = self.geometry()
        return g.latent_frames(self.frames), self.height // g.spatial_stride, self.width // g.spatial_stride

    def local_grid(self) -> tuple[int, int, int]:
        """One CP rank's latent grid, tail padding included (as parallel/context_parallel.FrameShard)."""
        f, h, w = self.latent_grid()
        pt = self.config().patch_size[0]
        return math.ceil(f // pt / self.cp) * pt, h, w

    def shard(self) -> int:
        """The FSDP2 shard-group size (megatron engine): dp_shard, -1 meaning every DP x CP rank."""
        return self.gpus // self.tp if self.dp_shard == -1 else self.dp_shard

    def samples_per_gpu(self) -> int:
        """Samples whose activations one GPU holds: both members (batched), one (sequential), one side (ranks)."""
        return {"batched": 2 * self.pairs, "sequential": 1, "ranks": self.pairs}[self.pair_mode]


def memory(setup: Setup) -> dict:
    """Per-GPU bytes by part, their "total", and "fits" (total within the GPU's memory).

    megatron and deepspeed as megatron_wan.train builds them: LoRA freezes a bf16 base and trains fp32
    adapters; full fine-tuning keeps fp32 master weights; both compute from bf16 copies (FSDP2's
    MixedPrecisionPolicy, ZeRO-3's bf16), so activations are bf16 but for the fp32 norms. The reference
    copy is sharded like the policy (megatron) or resident (deepspeed).
    """
    cfg, description = setup.config(), setup.description()
    full = setup.finetune == "full"
    count = description.count(0 if full else setup.lora_rank)
    tp = setup.tp
    local = count["total"] - count["split"] * (1 - 1 / tp)  # this TP rank's share
    block = count["block"] - count["block_split"] * (1 - 1 / tp)
    lora = count["lora"] / tp
    trained, base_bytes = (local, FP32) if full else (lora, BF16)
    gathered = 2 * block * BF16  # ZeRO-3 / FSDP: the block being computed and the one prefetched
    if setup.engine == "megatron":  # FSDP2 over the DP x CP ranks: master state sharded, bf16 compute copies
        shard = setup.shard()
        state = sharded_state_bytes(description, setup.finetune, setup.lora_rank, shard, tp, base_bytes)
        weights = state["weights"] + gathered + count["other"] * BF16  # the root stays gathered
        optimizer, reference_copy = state["optimizer"], state["weights"]  # the copy sharded the same way
        if setup.pair_mode == "sequential":  # two backward passes, one reduction: unsharded fp32 until then
            grads = trained * FP32
        else:  # reduce-scattered block by block: the sharded gradients and one block's unsharded ones
            grads = state["grads"] + (block * FP32 if full and shard > 1 else 0)
    else:  # deepspeed: ZeRO-3 in bf16, parameters and optimizer offloaded to CPU
        weights, grads, optimizer = gathered, min(trained, DEEPSPEED_REDUCE_BUCKET) * BF16, 0
        reference_copy = local * base_bytes + lora * FP32
    reference = {"adapter": 0, "copy": reference_copy, "copy_offload": block * base_bytes}[setup.reference]
    if setup.expert == "both":  # A14B: the other expert's weights, optimizer state and copy stay resident; one
        # expert computes per step, so gathered blocks, gradients and activations are one expert's
        weights += state["weights"] + count["other"] * BF16 if setup.engine == "megatron" else 0
        optimizer, reference = 2 * optimizer, 2 * reference
    act_bytes = BF16  # FSDP2 computes with bf16 copies of every parameter (biases too), ZeRO-3 in bf16
    acts = activation_bytes(cfg, setup.local_grid(), setup.text_len, setup.samples_per_gpu(), tp, setup.cp,
                            act_bytes, setup.recompute, 0 if full else setup.lora_rank)
    s = description.video_tokens(setup.local_grid()) * setup.samples_per_gpu()
    in_flight = s * (4 * cfg.dim * FP32 + 2 * cfg.ffn_dim // tp * act_bytes)  # gradients alive in a block's backward
    out = {
        "weights": weights, "grads": grads, "optimizer": optimizer, "reference": reference,
        "encoders": (UMT5_XXL_ENCODER_PARAMS + VAE_PARAMS + CLIP_VISUAL_PARAMS * cfg.has_image_tokens) * BF16
                    if setup.encoders == "gpu" else 0,
        "activations": acts["total"], "buffers": setup.reserve_gib * GIB + in_flight,
    }
    out = {name: int(v) for name, v in out.items()}
    out["total"] = sum(out.values())
    out["fits"] = out["total"] <= GPUS[setup.gpu].memory
    return out


def longest_video(setup: Setup) -> int:
    """The most frames (1 + 4k) whose pairs fit, 0 when not even one frame fits."""
    frames = setup.geometry().frames  # latent frames -> video frames (1 + 4k for Wan 2.1's VAE)
    fits = lambda k: memory(dataclasses.replace(setup, frames=frames(1 + k)))["fits"]  # noqa: E731
    if not fits(0):
        return 0
    lo, hi = 0, setup.config().rope_max_seq_len - 1  # RoPE covers this many token frames
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return frames(1 + lo)


def step_time(setup: Setup) -> dict:
    """Seconds per step at `setup.mfu` of peak (compute only: no communication or offload traffic)."""
    group = setup.tp * setup.cp * (2 if setup.pair_mode == "ranks" else 1)  # GPUs sharing one pair
    flops = step_flops(setup.description(), setup.latent_grid(), setup.text_len, setup.pairs, "regdpo", setup.pair_mode,
                       setup.lora_rank if setup.finetune == "lora" else 0, setup.recompute)["total"]
    seconds = flops / (group * GPUS[setup.gpu].peak_flops * setup.mfu)
    return {"step_flops": flops, "step_s": seconds, "pairs_per_step": setup.pairs * setup.gpus // group}


def plan(setup: Setup) -> list[dict]:
    """Rows for `setup`, for it on our other engine (when its TP allows; deepspeed runs pairs batched), for it
    fully sharded (dp_shard -1, when it replicates), and for two FSDP baselines on our engine: "fsdp" (the same
    but fully sharded, no CP) and "fsdp alone" (A.2's starting point: also both members of a pair on one GPU,
    the reference copy resident, the encoders on the GPU).

    Each row: name, setup, memory, longest_frames, capacity_vs_fsdp (longest over the fsdp row's),
    step_flops, step_s, pairs_per_step. capacity_vs_fsdp is None when no frame fits under fsdp.
    """
    setups = [setup]
    if setup.engine == "megatron" and setup.tp == 1:
        setups.append(dataclasses.replace(setup, engine="deepspeed", pair_mode="batched", dp_shard=1))
    elif setup.engine == "deepspeed":
        setups.append(dataclasses.replace(setup, engine="megatron"))
    if setup.dp_shard == 1:
        setups.append(dataclasses.replace(setup, engine="megatron", dp_shard=-1))
    fsdp = dataclasses.replace(setup, engine="megatron", dp_shard=-1, tp=1, cp=1)
    alone = dataclasses.replace(fsdp, pair_mode="batched", reference="copy", encoders="gpu")

    def name(s):
        shard = f" dp_shard {s.shard()}" if s.engine == "megatron" and s.shard() > 1 else ""
        return f"{s.engine} tp{s.tp} cp{s.cp}{shard}"

    names = [name(s) for s in setups] + ["fsdp tp1 cp1", "fsdp alone"]
    setups.append(fsdp)
    rows = [{"name": name, "setup": dataclasses.asdict(s), "memory": memory(s), "longest_frames": longest_video(s),
             **step_time(s)} for name, s in zip(names, setups + [alone])]
    baseline = next(r for r in rows if r["setup"] == dataclasses.asdict(fsdp))["longest_frames"]
    for row in rows:
        row["capacity_vs_fsdp"] = row["longest_frames"] / baseline if baseline else None
    return rows


def _table(rows: list[dict], setup: Setup) -> str:
    parts = {"weights": "weights", "grads": "grads", "optimizer": "optim", "reference": "ref", "encoders": "enc",
             "activations": "acts", "buffers": "buffers", "total": "total"}
    gpu = GPUS[setup.gpu]
    lines = [f"{setup.preset}, {setup.height}x{setup.width}, pairs of {setup.frames}-frame videos "
             f"(latent grid {setup.latent_grid()}), {setup.gpus} x {gpu.name} ({gpu.memory / GIB:.1f} GiB), "
             f"{setup.finetune}, recompute {setup.recompute}, MFU {setup.mfu}",
             f"{'':<28}{'pair mode':>11}{'reference':>13}" + "".join(f"{label:>8}" for label in parts.values())
             + f"{'fits':>6}{'longest':>9}{'x fsdp':>8}{'s/step':>8}{'pairs/step':>11}"]
    for row in rows:
        s, m = row["setup"], row["memory"]
        ratio = "-" if row["capacity_vs_fsdp"] is None else f"{row['capacity_vs_fsdp']:.2f}"
        lines.append(f"{row['name']:<28}{s['pair_mode']:>11}{s['reference']:>13}"
                     + "".join(f"{m[p] / GIB:>8.1f}" for p in parts)
                     + f"{'yes' if m['fits'] else 'no':>6}{row['longest_frames']:>9}{ratio:>8}"
                     + f"{row['step_s']:>8.1f}{row['pairs_per_step']:>11}")
    lines.append(f"memory: GiB per GPU at {setup.frames} frames; longest: frames (1 + 4k) per video that fit; "
                 f"x fsdp: longest over the fsdp row's; s/step: compute only")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Setup):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            ap.add_argument(flag, type=str if field.default is None else type(field.default), default=field.default)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = vars(ap.parse_args(argv))
    as_json = args.pop("json")
    try:
        setup = Setup(**args)
    except ValueError as e:
        ap.error(str(e))
    rows = plan(setup)
    print(json.dumps(rows, indent=1) if as_json else _table(rows, setup))
    return rows


if __name__ == "__main__":
    main()
