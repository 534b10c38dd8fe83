"""ModuleSpecs of the Wan block: a local provider (megatron-core parallel linears, torch norms, our core
attention) and a Transformer Engine provider, chosen once at start-up."""

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_wan.model.attention import CoreAttention
from megatron_wan.model.layers import WanAttention, WanAttentionSubmodules, WanBlock, WanBlockSubmodules
from megatron_wan.model.norms import FP32LayerNorm, HeadRMSNorm


class LocalColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear computed by torch's F.linear: the bias fused into the matmul and, under autocast, in the
    autocast dtype (megatron-core adds the fp32 bias after the matmul, which promotes every output, the residual
    stream and what is saved for backward to fp32). The bias is always added: a caller asking for skip_bias_add
    gets None in its place, which megatron-core's MLP handles."""

    def __init__(self, *args, skip_bias_add: bool = False, **kwargs):
        super().__init__(*args, skip_bias_add=False, **kwargs)

    def _forward_impl(self, input, weight, bias=None, allreduce_dgrad=False, tp_group=None, **_):
        if allreduce_dgrad:  # the input gradient sums over the TP ranks
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return F.linear(input, weight, bias)


class LocalRowLinear(RowParallelLinear):
    """RowParallelLinear computed by F.linear, its bias added after the TP reduction in the output's dtype; without
    TP (nothing to reduce) fused into the matmul and always added, as LocalColumnLinear does."""

    def __init__(self, *args, skip_bias_add: bool = False, **kwargs):
        super().__init__(*args, skip_bias_add=True, **kwargs)
        self.add_bias = not skip_bias_add
        self.fuse_bias = self.tp_group.size() == 1

    def _forward_impl(self, input, weight, **_):
        return F.linear(input, weight, self.bias if self.fuse_bias else None)

    def forward(self, input_):
        out, bias = super().forward(input_)
        if bias is None or self.fuse_bias:
            return out, None
        bias = bias.to(out.dtype)
        return (out + bias, None) if self.add_bias else (out, bias)


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
    """megatron-core's Column/RowParallelLinear computed by F.linear, torch norms (runs on CPU and GPU)."""
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
