"""Wan's input embeddings: patches, timesteps, text (umT5) and CLIP image tokens, and the output head."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_wan.models.wan21.norms import FP32LayerNorm


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of N timesteps, cos half first (Wan's order), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TwoLayerMLP(nn.Module):
    """Linear -> activation -> Linear, with Wan's parameter names linear_1 / linear_2."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, activation):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, out_dim)
        self.activation = activation

    def forward(self, x):
        return self.linear_2(self.activation(self.linear_1(x)))


class TimeEmbedding(nn.Module):
    """timesteps [n, B] -> (temb [n, B, dim] for the head, t_mod [n, B, 6, dim] for the blocks), in float32.

    Sequence-first like the tokens: n = 1 for one timestep per sample (broadcast over the tokens), or one per
    token (Wan 2.2 TI2V's per-token timesteps)."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedding = TwoLayerMLP(freq_dim, dim, dim, F.silu)
        self.time_projection = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor):
        dtype = self.time_projection.weight.dtype
        temb = self.time_embedding(timestep_sinusoid(timestep.flatten(), self.freq_dim).to(dtype))
        t_mod = self.time_projection(F.silu(temb)).unflatten(1, (6, -1))
        return temb.unflatten(0, timestep.shape).float(), t_mod.unflatten(0, timestep.shape).float()


class ImageEmbedding(nn.Module):
    """CLIP ViT-H/14 tokens [B, 257, image_dim] -> [B, 257, dim]: LayerNorm, MLP (exact GELU), LayerNorm."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)
        self.mlp = TwoLayerMLP(image_dim, image_dim, dim, F.gelu)
        self.norm2 = FP32LayerNorm(dim)

    def forward(self, x):
        return self.norm2(self.mlp(self.norm1(x)))


class Head(nn.Module):
    """Final adaLN (2-vector modulation of the time embedding) and the linear projection to patches."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.linear = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x [s, b, dim], temb [1 or s, b, dim] float32 (per sample or per token) -> [s, b, out_features]."""
        shift, scale = (self.modulation.float() + temb[:, :, None].float()).unbind(2)
        return self.linear((self.norm(x.float()) * (1 + scale) + shift).type_as(x))
