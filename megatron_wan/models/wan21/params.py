"""The one description of a Wan 2.1 DiT's parameters (models/parameters.py): every parameter in our naming, every
linear with the tokens it reads and its TP mode, every attention product. The adapter's table, the parameter
counts, the planner's state bytes and the FLOP count all derive from `describe`."""

import math

from megatron_wan.models.parameters import Builder, Description
from megatron_wan.models.wan21.config import WanConfig
from megatron_wan.models.wan21.lora import DEFAULT_TARGETS

CLIP_TOKENS = 257  # CLIP ViT-H/14 penultimate tokens (1 class + 16 x 16 patches) of Wan 2.1 I2V


def describe(cfg: WanConfig) -> Description:
    """The parameters, linears and attention products of `cfg` (full, unsplit shapes), in state-dict order."""
    d, patch, b = cfg.dim, math.prod(cfg.patch_size), Builder()
    b.linear("patch_embedding", cfg.in_dim * patch, d, "video", "patch_embed", kernel=cfg.patch_size)
    time = "video" if cfg.expand_timesteps else "time"  # per-token timesteps (Wan 2.2 TI2V): embedded per token
    b.linear("time.time_embedding.linear_1", cfg.freq_dim, d, time, "time_embed")
    b.linear("time.time_embedding.linear_2", d, d, time, "time_embed")
    b.linear("time.time_projection", d, 6 * d, time, "time_embed")
    b.linear("text_embedding.linear_1", cfg.text_dim, d, "text", "text_embed")
    b.linear("text_embedding.linear_2", d, d, "text", "text_embed")
    if cfg.has_image_tokens:
        b.norm("image_embedding.norm1", cfg.image_dim)
        b.linear("image_embedding.mlp.linear_1", cfg.image_dim, cfg.image_dim, "image", "image_embed")
        b.linear("image_embedding.mlp.linear_2", cfg.image_dim, d, "image", "image_embed")
        b.norm("image_embedding.norm2", d)
    for n in range(cfg.num_layers):
        b.block, p = n, f"blocks.{n}."
        b.param(p + "modulation", (1, 6, d))
        for attn, keys, part in (("self_attention", "video", "self_attn"), ("cross_attention", "text", "cross_attn")):
            b.linear(f"{p}{attn}.linear_q", d, d, "video", f"{part}_proj", "column")
            b.linear(f"{p}{attn}.linear_k", d, d, keys, f"{part}_proj", "column")
            b.linear(f"{p}{attn}.linear_v", d, d, keys, f"{part}_proj", "column")
            b.linear(f"{p}{attn}.linear_proj", d, d, "video", f"{part}_proj", "row")
            if cfg.qk_norm:
                b.norm(f"{p}{attn}.q_norm", d, bias=False, split=0)
                b.norm(f"{p}{attn}.k_norm", d, bias=False, split=0)
            b.attention("video", keys, d, f"{part}_core")
        if cfg.has_image_tokens:  # the same queries over the CLIP tokens, added to the text attention's output
            b.linear(p + "cross_attention.linear_k_img", d, d, "image", "image_attn_proj", "column")
            b.linear(p + "cross_attention.linear_v_img", d, d, "image", "image_attn_proj", "column")
            b.norm(p + "cross_attention.k_img_norm", d, bias=False, split=0)
            b.attention("video", "image", d, "image_attn_core")
        if cfg.cross_attn_norm:
            b.norm(p + "cross_norm", d)
        b.linear(p + "mlp.linear_fc1", d, cfg.ffn_dim, "video", "mlp", "column")
        b.linear(p + "mlp.linear_fc2", cfg.ffn_dim, d, "video", "mlp", "row")
    b.block = None
    b.param("head.modulation", (1, 2, d))
    b.linear("head.linear", d, cfg.out_dim * patch, "video", "head")
    return b.build(cfg.patch_size, {"time": 1, "image": CLIP_TOKENS}, DEFAULT_TARGETS)
