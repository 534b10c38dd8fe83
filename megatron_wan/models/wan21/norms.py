"""Normalization layers of the Wan block: fp32 LayerNorm and RMSNorm across all heads under TP."""

import torch
import torch.nn.functional as F
from torch import nn

from megatron_wan import parallel


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input dtype (as Wan and diffusers do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the full q or k vector (all heads), with the vector split over TP ranks.

    Each rank holds `hidden_size / tp` channels and the matching slice of the weight; the mean square
    is the all-reduced sum over ranks divided by the full width, so the result equals the unsplit norm.
    The all-reduce is differentiable (its backward all-reduces the gradient), which is what a norm
    followed by head-sharded attention needs.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        tp = parallel.tp_size()
        if hidden_size % tp:
            raise ValueError(f"q/k width {hidden_size} is not divisible by tensor_parallel={tp}")
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size // tp))
        self.weight.tensor_model_parallel = tp > 1
        self.weight.partition_dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sumsq = xf.pow(2).sum(-1, keepdim=True)
        if parallel.tp_size() > 1:
            sumsq = parallel.all_reduce_sum(sumsq, parallel.tp_group())
        y = xf * torch.rsqrt(sumsq / self.hidden_size + self.eps)
        return (y * self.weight.float()).type_as(x)
