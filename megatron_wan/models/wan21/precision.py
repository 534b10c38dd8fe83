"""Which parameters stay float32 when the model computes in a lower precision: diffusers' own rule for
WanTransformer3DModel (`_keep_in_fp32_modules`: the time embedder, the modulation tables `scale_shift_table`, the
cross-attention norm `norm2`, the CLIP norms), matched as diffusers' loader matches it (a part of the parameter's
diffusers name) on our names through the adapter's renames. One rule for every cast: FSDP2's compute dtype
(megatron_wan.parallel.parallelize), LoRA's frozen base (megatron_wan.train) and the sampler's model dtype."""

import torch
from torch import nn

from megatron_wan.models.wan21.adapter import rename


def fp32_parameters(model: nn.Module) -> set:
    """The parameters of `model` (a WanModel, or Wan 2.2's Experts of two) that diffusers keeps in float32; none
    for a module that is not a Wan transformer (no `wan` config: diffusers has no rule for it)."""
    from diffusers import WanTransformer3DModel

    members = getattr(model, "experts", (model,))
    if not all(hasattr(m, "wan") for m in members):
        return set()
    keep = set(WanTransformer3DModel._keep_in_fp32_modules)
    return {p for m in members for name, p in m.named_parameters() if keep & set(rename(name, "diffusers").split("."))}


@torch.no_grad()
def cast_parameters(model: nn.Module, dtype: torch.dtype, params=None) -> None:
    """Cast `params` (default: all of `model`'s) to `dtype` in place, but those that stay float32."""
    keep = fp32_parameters(model)
    for p in model.parameters() if params is None else params:
        if p not in keep:
            p.data = p.data.to(dtype)
