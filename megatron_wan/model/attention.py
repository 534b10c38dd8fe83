"""Core (softmax) attention behind one interface: torch sdpa, flash-attn or Transformer Engine.

All take q [s_q, b, n, d], k and v [s_k, b, n, d] (sequence-first, local heads) and return
[s_q, b, n * d]. The backend is chosen once at start-up; `auto` picks the best one present.
Self-attention under context parallelism also takes the rank's FrameShard and attends across the
CP group (`cp_comm`, see parallel/context_parallel.py).
"""

import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_wan import parallel
from megatron_wan.parallel.context_parallel import (
    FrameShard,
    check_ulysses_heads,
    ring_attention,
    ulysses_attention,
)

_PACKAGES = {"flash": ("flash_attn", "flash-attn"), "te": ("transformer_engine", "transformer-engine")}


def _usable(backend: str) -> bool:
    module, _ = _PACKAGES[backend]
    return torch.cuda.is_available() and importlib.util.find_spec(module) is not None


def resolve_backend(name: str) -> str:
    """`auto` -> te, then flash, then sdpa, whichever is usable first; an absent one asked for is an error."""
    if name == "auto":
        return next((b for b in ("te", "flash") if _usable(b)), "sdpa")
    if name == "sdpa":
        return name
    if name not in _PACKAGES:
        raise ValueError(f"attention_backend: expected auto, sdpa, flash or te, found {name!r}")
    module, package = _PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"attention_backend={name!r} needs the {package} package, which is not installed "
            f"(install the [gpu] extra: pip install -e .[gpu])"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"attention_backend={name!r} needs a CUDA device; none is available")
    return name


def resolve_cp_comm(name: str, backend: str) -> str:
    """`auto` -> te when the attention backend is Transformer Engine, else ring."""
    if name == "auto":
        return "te" if backend == "te" else "ring"
    if name == "te" and backend != "te":
        raise ValueError(f"cp_comm='te' is Transformer Engine's own context parallelism; it needs "
                         f"attention_backend='te', found {backend!r} (use ring or ulysses)")
    return name


class CoreAttention(nn.Module):
    """Non-causal softmax attention over local heads, scale 1/sqrt(d).

    `cp_comm` (self-attention only; None for cross-attention) says how keys of other CP ranks are reached.
    """

    def __init__(self, backend: str, num_local_heads: int, head_dim: int, cp_comm: str | None = None):
        super().__init__()
        self.backend = resolve_backend(backend)
        self.cp_comm = None if cp_comm is None else resolve_cp_comm(cp_comm, self.backend)
        cp = parallel.cp_size()
        if cp > 1 and self.cp_comm == "ulysses":
            check_ulysses_heads(num_local_heads, cp)
        if self.backend == "te":
            from transformer_engine.pytorch import DotProductAttention

            self.te_attention = DotProductAttention(
                num_local_heads, head_dim, attn_mask_type="no_mask", qkv_format="sbhd", attention_dropout=0.0
            )
            if cp > 1 and self.cp_comm == "te":
                group = parallel.cp_group()
                self.te_attention.set_context_parallel_group(
                    group, dist.get_process_group_ranks(group), torch.cuda.Stream(), "p2p")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                shard: FrameShard | None = None) -> torch.Tensor:
        """Attention of q over k, v; with a CP `shard` (self-attention) over the keys of the whole video."""
        if shard is None or shard.size == 1:
            return self._attend(q, k, v)
        if self.cp_comm == "ring":
            return ring_attention(q, k, v, shard)
        if self.cp_comm == "ulysses":
            return ulysses_attention(q, k, v, shard, self._attend)
        if shard.padded:  # te: its CP has no notion of our tail padding
            raise ValueError(f"cp_comm='te' needs the token frames ({shard.grid[0]}) divisible by "
                             f"context_parallel={shard.size}; use cp_comm=ring or ulysses for this video length")
        return self._attend(q, k, v)  # Transformer Engine exchanges K/V over the CP group itself

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, b = q.shape[:2]
        if self.backend == "te":
            return self.te_attention(q, k, v).reshape(s, b, -1)
        if self.backend == "flash":
            from flash_attn import flash_attn_func

            out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
            return out.transpose(0, 1).reshape(s, b, -1)
        out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
