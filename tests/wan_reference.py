"""The parity helpers of the tests: diffusers' model with every parameter perturbed, matching inputs, rel_err
(one copy, in megatron_wan.bench.parity, which gpu_check uses too)."""

import torch

from megatron_wan.bench.parity import inputs, perturbed_reference, rel_err
from megatron_wan.models.wan21.adapter import rename

__all__ = ["assert_forward_matches", "assert_gradients_match", "inputs", "perturbed_reference", "rel_err"]


def assert_forward_matches(ref, ours, cfg, x, t, text, clip):
    """Our output equals diffusers' (`ref`) on the same inputs, < 1e-5 relative."""
    with torch.no_grad():
        expected = ref(x, t, text, clip, return_dict=False)[0]
        got = ours(x, t, text, clip)
    assert got.shape == expected.shape == (x.shape[0], cfg.out_dim, *x.shape[2:])
    assert rel_err(got, expected) < 1e-5


def assert_gradients_match(ref, ours, cfg, x, t, text, clip):
    """The input gradient and every parameter gradient of a weighted sum of the output equal diffusers', < 1e-5."""
    weight = torch.randn(x.shape[0], cfg.out_dim, *x.shape[2:], generator=torch.Generator().manual_seed(0))
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref(xr, t, text, clip, return_dict=False)[0] * weight).sum().backward()
    (ours(xo, t, text, clip) * weight).sum().backward()
    assert rel_err(xo.grad, xr.grad) < 1e-5
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, ref_grads[rename(name, "diffusers")].grad) < 1e-5, name
