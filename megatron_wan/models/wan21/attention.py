"""Core (softmax) attention behind one interface: torch sdpa, flash-attn or Transformer Engine.

All take q [s_q, b, n, d], k and v [s_k, b, n, d] (sequence-first, local heads) and return
[s_q, b, n * d]. The backend is chosen once at start-up; `auto` picks the best one that is present and
has passed `python -m megatron_wan.bench gpu_check` on a GPU (VERIFIED_ON_GPU; until then: sdpa). Each
call then runs the chosen kernel only where it can (`kernel_for_call`): flash-attn and TE take fp16/bf16 CUDA
tensors with a head dim that is a multiple of 8 up to 256 (TE would fall back to an unfused path that materializes
the score matrix), so other calls run sdpa, said once. Self-attention under context parallelism also takes the
rank's FrameShard and attends across the CP group (`cp_comm`, see parallel/context_parallel.py).
"""

import importlib.util
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_wan import parallel
from megatron_wan.parallel.context_parallel import (
    FrameShard,
    check_ulysses_heads,
    cp_comm_for_call,
    kernel_for_call,
    kernel_heads,
    resolve_cp_comm,
    ring_attention,
    ulysses_attention,
)

_PACKAGES = {"flash": ("flash_attn", "flash-attn"), "te": ("transformer_engine", "transformer-engine")}

# What has passed `python -m megatron_wan.bench gpu_check` on a GPU (README, "First run on GPUs"): `auto` picks
# only these. Empty until a GPU run is recorded: on CUDA, auto means megatron-core linears and torch SDPA.
VERIFIED_ON_GPU = {"attention_backend": (), "layer_provider": (), "cp_comm": ()}


def _usable(backend: str) -> bool:
    module, _ = _PACKAGES[backend]
    return torch.cuda.is_available() and importlib.util.find_spec(module) is not None


def resolve_backend(name: str, verified=None) -> str:
    """`auto` -> te, then flash, whichever is usable and in `verified` (default: VERIFIED_ON_GPU's), else sdpa;
    an absent one asked for is an error."""
    verified = VERIFIED_ON_GPU["attention_backend"] if verified is None else verified
    if name == "auto":
        return next((b for b in ("te", "flash") if b in verified and _usable(b)), "sdpa")
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


_SAID = set()


def _say_once(backend: str, dtype: torch.dtype, device_type: str, head_dim: int) -> None:
    if (backend, dtype, device_type, head_dim) not in _SAID:
        _SAID.add((backend, dtype, device_type, head_dim))
        warnings.warn(f"attention_backend={backend!r} takes fp16/bf16 CUDA tensors with a head dim that is a "
                      f"multiple of 8 up to 256; {dtype} on {device_type}, head dim {head_dim}, runs torch sdpa "
                      f"instead", stacklevel=3)


class CoreAttention(nn.Module):
    """Non-causal softmax attention over local heads, scale 1/sqrt(d).

    `cp_comm` (self-attention only; None for cross-attention) says how keys of other CP ranks are reached.
    """

    def __init__(self, backend: str, num_local_heads: int, head_dim: int, cp_comm: str | None = None):
        super().__init__()
        self.backend = resolve_backend(backend)
        self.head_dim = head_dim
        self.requested_cp_comm = cp_comm
        verified = VERIFIED_ON_GPU["cp_comm"]
        self.cp_comm = None if cp_comm is None else resolve_cp_comm(cp_comm, self.backend, verified)
        cp = parallel.cp_size()
        if cp > 1 and self.cp_comm == "ulysses":
            check_ulysses_heads(num_local_heads, cp)
        if self.backend == "te":
            from transformer_engine.pytorch import DotProductAttention

            # the heads this kernel is handed: after Ulysses' all-to-all, num_local_heads / cp
            self.te_attention = DotProductAttention(
                kernel_heads(num_local_heads, cp, self.cp_comm), head_dim, attn_mask_type="no_mask",
                qkv_format="sbhd", attention_dropout=0.0,
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
        comm = cp_comm_for_call(self.cp_comm, self.requested_cp_comm, shard, self.head_dim, q.dtype)
        if comm == "ring":
            return ring_attention(q, k, v, shard)
        if comm == "ulysses":
            return ulysses_attention(q, k, v, shard, self._attend)
        return self._attend(q, k, v)  # Transformer Engine exchanges K/V over the CP group itself

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, b = q.shape[:2]
        kernel = kernel_for_call(self.backend, q.dtype, q.device.type, q.shape[-1])
        if kernel != self.backend:
            _say_once(self.backend, q.dtype, q.device.type, q.shape[-1])
        if kernel == "te":
            return self.te_attention(q, k, v).reshape(s, b, -1)
        if kernel == "flash":
            from flash_attn import flash_attn_func

            out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
            return out.transpose(0, 1).reshape(s, b, -1)
        out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
