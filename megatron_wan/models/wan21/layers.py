"""The Wan transformer block on megatron-core parallel linears, sequence-first [s, b, h].

Submodules come from a ModuleSpec (see specs.py) so the same block runs on megatron-core's local
linears on CPU and on Transformer Engine's on GPU.
"""

from dataclasses import dataclass, field

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from megatron_wan import parallel
from megatron_wan.models.wan21.rope import apply_rope


@dataclass
class WanAttentionSubmodules:
    linear_q: ModuleSpec | type
    linear_k: ModuleSpec | type
    linear_v: ModuleSpec | type
    linear_proj: ModuleSpec | type
    q_norm: ModuleSpec | type
    k_norm: ModuleSpec | type
    core_attention: ModuleSpec | type


@dataclass
class WanBlockSubmodules:
    self_attention: ModuleSpec
    cross_attention: ModuleSpec
    mlp: ModuleSpec
    adaln_norm: ModuleSpec | type  # non-affine, shared shape for norm1 and norm3
    cross_norm: ModuleSpec | type  # affine LayerNorm before cross-attention
    extra: dict = field(default_factory=dict)


def _column(spec, config, in_size, out_size):
    return build_module(spec, in_size, out_size, config=config, init_method=config.init_method, bias=True,
                        gather_output=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name=None,
                        tp_group=parallel.tp_group())


def _row(spec, config, in_size, out_size):
    return build_module(spec, in_size, out_size, config=config, init_method=config.output_layer_init_method,
                        bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False,
                        tp_comm_buffer_name=None, tp_group=parallel.tp_group())


class WanAttention(MegatronModule):
    """Wan self- or cross-attention: q/k/v column-parallel, q/k RMSNorm across heads, output row-parallel.

    Self-attention applies 3D RoPE to q and k. Cross-attention (`cross=True`) attends to the text tokens;
    with `image=True` (I2V) a second key/value projection of the CLIP tokens, with its own k-norm, is
    attended to by the same queries and the two outputs are added before the output projection.
    """

    def __init__(self, config, submodules: WanAttentionSubmodules, attention_backend: str,
                 cross: bool = False, image: bool = False, qk_norm: bool = True, cp_comm: str = "auto"):
        super().__init__(config)
        dim, tp = config.hidden_size, parallel.tp_size()
        if config.num_attention_heads % tp:
            raise ValueError(f"num_heads={config.num_attention_heads} is not divisible by tensor_parallel={tp}")
        self.cross = cross
        self.local_heads = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.linear_q = _column(submodules.linear_q, config, dim, dim)
        self.linear_k = _column(submodules.linear_k, config, dim, dim)
        self.linear_v = _column(submodules.linear_v, config, dim, dim)
        self.linear_proj = _row(submodules.linear_proj, config, dim, dim)
        self.q_norm = build_module(submodules.q_norm, dim, config.layernorm_epsilon) if qk_norm else nn.Identity()
        self.k_norm = build_module(submodules.k_norm, dim, config.layernorm_epsilon) if qk_norm else nn.Identity()
        self.core_attention = build_module(submodules.core_attention, attention_backend, self.local_heads,
                                           self.head_dim, None if cross else cp_comm)
        if image:
            self.linear_k_img = _column(submodules.linear_k, config, dim, dim)
            self.linear_v_img = _column(submodules.linear_v, config, dim, dim)
            self.k_img_norm = build_module(submodules.k_norm, dim, config.layernorm_epsilon)
        self.image = image

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.local_heads, self.head_dim))

    def _project(self, linear, x):
        out, _ = linear(x)
        return out

    def forward(self, x, context=None, image_context=None, rope=None, shard=None):
        """x [s, b, dim]; context [L, b, dim] (cross); image_context [257, b, dim] (I2V); rope (cos, sin);
        shard: the context-parallel FrameShard x belongs to (self-attention)."""
        kv_in = context if self.cross else x
        q = self._heads(self.q_norm(self._project(self.linear_q, x)))
        k = self._heads(self.k_norm(self._project(self.linear_k, kv_in)))
        v = self._heads(self._project(self.linear_v, kv_in))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.core_attention(q, k, v, shard)
        if self.image:
            k_img = self._heads(self.k_img_norm(self._project(self.linear_k_img, image_context)))
            v_img = self._heads(self._project(self.linear_v_img, image_context))
            out = out + self.core_attention(q, k_img, v_img)
        return self._project(self.linear_proj, out)


class WanBlock(MegatronModule):
    """One Wan DiT block: adaLN-modulated self-attention, cross-attention, adaLN-modulated GELU-tanh MLP.

    The modulation is the block's learned table [1, 6, dim] plus the time projection (per sample, or per token for
    Wan 2.2 TI2V), computed in float32 as Wan does; residual gates are applied in float32 too.
    """

    def __init__(self, config, submodules: WanBlockSubmodules, wan):
        super().__init__(config)
        dim, eps = config.hidden_size, config.layernorm_epsilon
        self.norm1 = build_module(submodules.adaln_norm, dim, eps, elementwise_affine=False)
        self.self_attention = build_module(submodules.self_attention, config=config,
                                           attention_backend=wan.attention_backend, qk_norm=wan.qk_norm,
                                           cp_comm=wan.cp_comm)
        self.cross_norm = (build_module(submodules.cross_norm, dim, eps, elementwise_affine=True)
                           if wan.cross_attn_norm else nn.Identity())
        self.cross_attention = build_module(submodules.cross_attention, config=config,
                                            attention_backend=wan.attention_backend, cross=True,
                                            image=wan.has_image_tokens, qk_norm=wan.qk_norm)
        self.norm3 = build_module(submodules.adaln_norm, dim, eps, elementwise_affine=False)
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size,
                                tp_group=parallel.tp_group())
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, context, image_context, t_mod, rope, shard=None):
        """x [s, b, dim] (a CP rank's `shard` of the video); t_mod [1 or s, b, 6, dim] float32 (per sample or per
        token of the shard); returns x's shape and dtype."""
        mod = self.modulation.float() + t_mod.float()  # [1 or s, b, 6, dim]
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unbind(2)  # each [1 or s, b, dim]
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.self_attention(h, rope=rope, shard=shard).float() * gate).type_as(x)
        h = self.cross_norm(x.float()).type_as(x)
        x = x + self.cross_attention(h, context=context, image_context=image_context)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        out, bias = self.mlp(h)
        out = out if bias is None else out + bias
        return (x.float() + out.float() * c_gate).type_as(x)
