"""FLOPs of a Wan forward, per component, and of a training step (SFT, DPO, Reg-DPO).

A multiply-add counts 2 FLOPs; only matrix products are counted (linears, the patch Conv3d, the two
products of attention: QK^T and AV). Norms, RoPE, softmax, activations and the adaLN modulation are
elementwise and left out, as torch.utils.flop_counter.FlopCounterMode leaves them out.

`grid` is the latent grid (frames, height, width) of one sample, before patching; the video has
prod(grid / patch_size) tokens. Totals are for the whole video: under context parallelism each of the
CP ranks does 1/CP of them (plus its share of tail padding), under tensor parallelism each TP rank 1/TP.
"""

import math

from megatron_wan.models.wan21.config import WanConfig

CLIP_TOKENS = 257  # CLIP ViT-H/14 penultimate tokens (1 class + 16 x 16 patches) of Wan 2.1 I2V


def video_tokens(cfg: WanConfig, grid) -> int:
    """Tokens of a latent grid (frames, height, width) after patching."""
    if any(n % p for n, p in zip(grid, cfg.patch_size)):
        raise ValueError(f"latent grid {list(grid)} is not divisible by patch {cfg.patch_size}")
    return math.prod(n // p for n, p in zip(grid, cfg.patch_size))


def _matmul(rows: int, inner: int, cols: int) -> int:
    return 2 * rows * inner * cols


def _attention_core(queries: int, keys: int, dim: int) -> int:
    """QK^T and AV over all heads: each a [queries, head_dim] x [head_dim, keys] product per head."""
    return 2 * _matmul(queries, dim, keys)


def _block_flops(cfg: WanConfig, s: int, text_len: int, lora_rank: int) -> dict:
    """FLOPs of one block on one sample of `s` video tokens, per component."""
    d, f = cfg.dim, cfg.ffn_dim
    out = {
        "self_attn_proj": _matmul(s, d, 4 * d),
        "self_attn_core": _attention_core(s, s, d),
        "cross_attn_proj": _matmul(s, d, 2 * d) + _matmul(text_len, d, 2 * d),
        "cross_attn_core": _attention_core(s, text_len, d),
        "mlp": _matmul(s, d, f) + _matmul(s, f, d),
    }
    if cfg.is_i2v:
        out["image_attn_proj"] = _matmul(CLIP_TOKENS, d, 2 * d)
        out["image_attn_core"] = _attention_core(s, CLIP_TOKENS, d)
    if lora_rank:  # down [in -> r] and up [r -> out] of every adapted linear, on that linear's input tokens
        square_inputs = 4 * s + 2 * s + 2 * text_len  # self q, k, v, proj; cross q, proj; cross k, v (text)
        out["lora"] = (square_inputs * 2 * _matmul(1, d, lora_rank)
                       + _matmul(s, d, lora_rank) + _matmul(s, lora_rank, f)  # fc1
                       + _matmul(s, f, lora_rank) + _matmul(s, lora_rank, d))  # fc2
    return out


def forward_flops(cfg: WanConfig, grid, text_len: int, batch: int = 1, lora_rank: int = 0) -> dict:
    """FLOPs of one forward of `batch` samples, per component (blocks summed over layers), plus "total".

    `lora_rank` > 0 adds the adapters' down and up projections on q, k, v, proj (self and cross) and the MLP.
    """
    s, d, patch = video_tokens(cfg, grid), cfg.dim, math.prod(cfg.patch_size)
    out = {
        "patch_embed": _matmul(s, cfg.in_dim * patch, d),
        "time_embed": _matmul(1, cfg.freq_dim, d) + _matmul(1, d, d) + _matmul(1, d, 6 * d),
        "text_embed": _matmul(text_len, cfg.text_dim, d) + _matmul(text_len, d, d),
    }
    if cfg.is_i2v:
        out["image_embed"] = _matmul(CLIP_TOKENS, cfg.image_dim, cfg.image_dim) + _matmul(CLIP_TOKENS, cfg.image_dim, d)
    out.update({name: cfg.num_layers * v for name, v in _block_flops(cfg, s, text_len, lora_rank).items()})
    out["head"] = _matmul(s, d, cfg.out_dim * patch)
    out = {name: batch * v for name, v in out.items()}
    out["total"] = sum(out.values())
    return out


def step_flops(cfg: WanConfig, grid, text_len: int, pairs: int = 1, objective: str = "regdpo",
               pair_mode: str = "batched", lora_rank: int = 0, recompute: bool = False) -> dict:
    """FLOPs of one training step on `pairs` pairs (SFT: on the `pairs` winners), by part, plus "total".

    The trained model's passes cost forward + backward = 3 forwards (model-FLOPs convention: a backward
    is two forwards, even where LoRA leaves base weights without gradients). DPO and Reg-DPO also run the
    frozen reference forward on winner and loser (no adapters: `adapter` disables them). `sequential`
    pairs measure each loser once more without a graph; `recompute` repeats the forward of the blocks.
    """
    if objective not in ("sft", "dpo", "regdpo"):
        raise ValueError(f"objective: expected sft, dpo or regdpo, found {objective!r}")
    preference = objective != "sft"
    samples = pairs * (2 if preference else 1)
    trained = forward_flops(cfg, grid, text_len, samples, lora_rank)["total"]
    blocks = cfg.num_layers * samples * sum(_block_flops(cfg, video_tokens(cfg, grid), text_len, lora_rank).values())
    parts = {
        "policy_forward": trained,
        "policy_backward": 2 * trained,
        "recompute": blocks if recompute else 0,
        "loser_remeasure": (forward_flops(cfg, grid, text_len, pairs, lora_rank)["total"]
                            if preference and pair_mode == "sequential" else 0),
        "reference_forward": forward_flops(cfg, grid, text_len, 2 * pairs)["total"] if preference else 0,
    }
    parts["total"] = sum(parts.values())
    return parts
