"""ModuleSpecs of the Wan block: a local provider (megatron-core parallel linears, torch norms, our core
attention) and a Transformer Engine provider, chosen once at start-up."""

import functools
import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_wan.models.wan21.attention import VERIFIED_ON_GPU, CoreAttention
from megatron_wan.models.wan21.layers import WanAttention, WanAttentionSubmodules, WanBlock, WanBlockSubmodules
from megatron_wan.models.wan21.norms import FP32LayerNorm, HeadRMSNorm


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


def te_classes() -> tuple[type, type, type]:
    """(TEColumnParallelLinear, TERowParallelLinear, transformer_engine.pytorch.LayerNorm) (CUDA only)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
    from transformer_engine.pytorch import LayerNorm

    return TEColumnParallelLinear, TERowParallelLinear, LayerNorm


@functools.cache
def te_layer_norm_class(base: type) -> type:
    """A module class over TE's LayerNorm `base` taking the block's (dim, eps, elementwise_affine) arguments.

    megatron-core's build_module returns a plain function uncalled, so a spec entry must be a class. TE's
    LayerNorm(normalized_shape, eps, ..., device, dtype) always holds `weight` and `bias` (the names the
    checkpoint conversion expects). Like the block's other torch modules it is built on the default device (TE's own
    default is CUDA) and moves with the model."""

    class TELayerNorm(base):
        def __init__(self, dim: int, eps: float, elementwise_affine: bool = True):
            if not elementwise_affine:
                raise ValueError("TE LayerNorm always has weight and bias; use it for affine norms only")
            super().__init__(dim, eps=eps, device=torch.get_default_device())

    TELayerNorm.__qualname__ = TELayerNorm.__name__ = f"TELayerNorm[{base.__name__}]"
    return TELayerNorm


def te_block_spec() -> ModuleSpec:
    """Transformer Engine linears and LayerNorm (CUDA only). The q/k norms stay ours: under TP they
    must see the whole vector across ranks, which TE's norms do not do."""
    column, row, layer_norm = te_classes()
    return _block_spec(column, row, te_layer_norm_class(layer_norm))


def te_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_provider(provider: str, verified=None) -> str:
    """`local`, `te`, or `auto`: te when Transformer Engine is usable and in `verified` (default:
    VERIFIED_ON_GPU's: it passed gpu_check on a GPU), else local. te asked for without TE is an error."""
    verified = VERIFIED_ON_GPU["layer_provider"] if verified is None else verified
    if provider == "auto":
        return "te" if "te" in verified and te_usable() else "local"
    if provider == "te" and not te_usable():
        raise ImportError("layer provider 'te' needs transformer-engine and a CUDA device (pip install -e .[gpu])")
    if provider not in ("local", "te"):
        raise ValueError(f"layer provider: expected auto, local or te, found {provider!r}")
    return provider


def block_spec(provider: str = "auto") -> ModuleSpec:
    """The block's ModuleSpec for `provider` (see resolve_provider)."""
    return te_block_spec() if resolve_provider(provider) == "te" else local_block_spec()
