"""TP=2 over two gloo processes equals TP=1: output, input gradient and every parameter gradient."""

import pytest
import torch
from wan_reference import inputs, perturbed_reference, rel_err

from megatron_wan import parallel
from megatron_wan.model import WanModel, preset
from megatron_wan.models.wan21.adapter import merge_tp
from megatron_wan.parallel.local import run_local


def forward_backward(cfg, state_dict, batch, tensor_parallel=1):
    """Output, input gradient and parameter gradients of a fixed weighted-sum loss (runs on any rank)."""
    parallel.initialize(tensor_parallel=tensor_parallel)
    model = WanModel.from_diffusers(state_dict, num_heads=cfg.num_heads)
    x, t, text, clip = batch
    x = x.clone().requires_grad_()
    out = model(x, t, text, clip)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_tp2_equals_tp1(name):
    cfg = preset(name)
    state_dict = perturbed_reference(cfg).state_dict()
    batch = inputs(cfg, (2, 3, 2), timesteps=(20.0, 800.0))
    out1, dx1, grads1 = forward_backward(cfg, state_dict, batch)
    ranks = run_local(forward_backward, 2, cfg, state_dict, batch, 2)
    for out, dx, _ in ranks:
        assert rel_err(out, out1) < 1e-5
        assert rel_err(dx, dx1) < 1e-5
    grads2 = merge_tp([g for _, _, g in ranks], cfg)
    assert sorted(grads2) == sorted(grads1)
    for n in grads1:
        assert rel_err(grads2[n], grads1[n]) < 1e-5, n
    # a sharded weight's slices differ between ranks; a replicated one's gradient is the same everywhere
    assert ranks[0][2]["blocks.0.self_attention.linear_q.weight"].shape[0] == cfg.dim // 2
    assert torch.allclose(ranks[0][2]["blocks.0.modulation"], ranks[1][2]["blocks.0.modulation"])
