"""ModuleSpecs of the Wan block: a local provider (megatron-core parallel linears, torch norms, our core
attention) and a Transformer Engine provider, chosen once at start-up."""

import importlib.util

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_wan.model.attention import CoreAttention
from megatron_wan.model.layers import WanAttention, WanAttentionSubmodules, WanBlock, WanBlockSubmodules
from megatron_wan.model.norms import FP32LayerNorm, HeadRMSNorm


def _bias_in_output_dtype(linear: type) -> type:
    """`linear` with its bias added in the dtype of the matmul's output.

    megatron-core adds the (fp32) bias to the matmul output as is, so under bf16 autocast every output would be
    promoted to fp32, and with it the residual stream, the MLP's hidden activations and what is saved for backward.
    torch's nn.Linear (and diffusers' Wan) keep the autocast dtype; so do these. Without autocast nothing changes.
    """

    class Linear(linear):
        def __init__(self, *args, skip_bias_add: bool = False, **kwargs):
            super().__init__(*args, skip_bias_add=True, **kwargs)
            self.add_bias = not skip_bias_add

        def forward(self, x, *args, **kwargs):
            out, bias = super().forward(x, *args, **kwargs)
            if bias is None:
                return out, None
            bias = bias.to(out.dtype)
            return (out + bias, None) if self.add_bias else (out, bias)

    Linear.__name__ = Linear.__qualname__ = linear.__name__
    return Linear


LocalColumnLinear = _bias_in_output_dtype(ColumnParallelLinear)
LocalRowLinear = _bias_in_output_dtype(RowParallelLinear)


def _block_spec(column, row, cross_norm) -> ModuleSpec:
    attention = ModuleSpec(
        module=WanAttention,
        submodules=WanAttentionSubmodules(
            linear_q=column, linear_k=column, linear_v=column, linear_proj=row,
            q_norm=HeadRMSNorm, k_norm=HeadRMSNorm, core_attention=CoreAttention,
        ),
    )
    return ModuleSpec(
        module=WanBlock,
        submodules=WanBlockSubmodules(
            self_attention=attention,
            cross_attention=attention,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            adaln_norm=FP32LayerNorm,
            cross_norm=cross_norm,
        ),
    )


def local_block_spec() -> ModuleSpec:
    """megatron-core ColumnParallelLinear / RowParallelLinear (bias in the output dtype), torch norms (CPU and GPU)."""
    return _block_spec(LocalColumnLinear, LocalRowLinear, FP32LayerNorm)


def te_block_spec() -> ModuleSpec:
    """Transformer Engine linears and LayerNorm (CUDA only). The q/k norms stay ours: under TP they
    must see the whole vector across ranks, which TE's norms do not do."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
    from transformer_engine.pytorch import LayerNorm

    def te_layer_norm(dim, eps, elementwise_affine=True):
        return LayerNorm(dim, eps=eps)

    return _block_spec(TEColumnParallelLinear, TERowParallelLinear, te_layer_norm)


def te_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def block_spec(provider: str = "auto") -> ModuleSpec:
    """`local`, `te`, or `auto` (te when Transformer Engine is importable on CUDA, else local)."""
    if provider == "auto":
        provider = "te" if te_usable() else "local"
    if provider == "local":
        return local_block_spec()
    if provider == "te":
        if not te_usable():
            raise ImportError("layer provider 'te' needs transformer-engine and a CUDA device (pip install -e .[gpu])")
        return te_block_spec()
    raise ValueError(f"layer provider: expected auto, local or te, found {provider!r}")
