"""A tiny perturbed Wan policy, a reference that differs from it, and a batch of pairs (T2V or I2V)."""

import torch
from wan_reference import perturbed_reference

from megatron_wan.model import WanModel, preset
from megatron_wan.objectives.pair_step import Conditions, PairBatch


def policy_and_reference(name="tiny", seed=0):
    cfg = preset(name, num_layers=1)
    policy = WanModel.from_diffusers(perturbed_reference(cfg, seed))
    reference = WanModel.from_diffusers(perturbed_reference(cfg, seed + 1)).eval()
    return cfg, policy, reference


def pair_batch(cfg, n=2, grid=(2, 4, 4), seed=5) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    shape = (n, cfg.out_dim, *grid)
    clip = torch.randn(n, 257, cfg.image_dim, generator=g) if cfg.is_i2v else None
    cond = torch.randn(n, cfg.in_dim - cfg.out_dim, *grid, generator=g) if cfg.is_i2v else None
    text = torch.randn(n, 7, cfg.text_dim, generator=g)
    return PairBatch(torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 1.5,
                     Conditions(text, clip, cond), list(range(100, 100 + n)))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
