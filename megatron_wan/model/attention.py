"""Core (softmax) attention behind one interface: torch sdpa, flash-attn or Transformer Engine.

All take q [s_q, b, n, d], k and v [s_k, b, n, d] (sequence-first, local heads) and return
[s_q, b, n * d]. The backend is chosen once at start-up; `auto` picks the best one present.
"""

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

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


class CoreAttention(nn.Module):
    """Non-causal softmax attention over local heads, scale 1/sqrt(d)."""

    def __init__(self, backend: str, num_local_heads: int, head_dim: int):
        super().__init__()
        self.backend = resolve_backend(backend)
        if self.backend == "te":
            from transformer_engine.pytorch import DotProductAttention

            self.te_attention = DotProductAttention(
                num_local_heads, head_dim, attn_mask_type="no_mask", qkv_format="sbhd", attention_dropout=0.0
            )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, b = q.shape[:2]
        if self.backend == "te":
            return self.te_attention(q, k, v).reshape(s, b, -1)
        if self.backend == "flash":
            from flash_attn import flash_attn_func

            out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
            return out.transpose(0, 1).reshape(s, b, -1)
        out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
