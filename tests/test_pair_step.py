"""Reg-DPO through the real model: Eq. 5's gradient, pair executions and reference strategies agree."""

import pytest
import torch
from pair_fixtures import grads, pair_batch, policy_and_reference
from wan_reference import rel_err

from megatron_wan import parallel
from megatron_wan.models.wan21.lora import apply_lora, lora_layers
from megatron_wan.objectives.flow_matching import FlowMatching
from megatron_wan.objectives.pair_step import PairObjective
from megatron_wan.objectives.reference import OffloadedCopyReference, make_reference
from megatron_wan.parallel.local import run_local

FLOW = FlowMatching(shift=3.0, seed=11)


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
@pytest.mark.parametrize("sft_weight", ["dgr", 0, 40.0])
def test_parameter_gradient_is_eq5(name, sft_weight):
    """autograd's gradient equals -[2(DGR+r)(y_w - ŷ_w)ᵀ∇ŷ_w - 2 DGR (y_l - ŷ_l)ᵀ∇ŷ_l] / (numel * n)."""
    cfg, policy, reference = policy_and_reference(name)
    batch = pair_batch(cfg)
    beta = 50.0
    out = PairObjective(FLOW, beta=beta, sft_weight=sft_weight).step(policy, reference, batch, step=3)
    got = grads(policy)
    policy.zero_grad()
    # Eq. 5 written out, with its own noising and errors
    sigma, eps = FLOW.draw(3, batch.sample_ids, batch.win.shape[1:])
    c = batch.conditions
    s4 = sigma.view(-1, 1, 1, 1, 1)

    def predict(net, x0):
        xt = torch.cat([(1 - s4) * x0 + s4 * eps] + ([c.cond] if c.cond is not None else []), dim=1)
        return net(xt, sigma * 1000, c.text, c.clip)

    y_w, y_l = eps - batch.win, eps - batch.lose
    yhat_w, yhat_l = predict(policy, batch.win), predict(policy, batch.lose)
    with torch.no_grad():
        ref_w, ref_l = predict(reference, batch.win), predict(reference, batch.lose)
    err = lambda y, yhat: (y - yhat).pow(2).flatten(1).mean(1)  # noqa: E731
    s = (err(y_w, yhat_w) - err(y_w, ref_w)) - (err(y_l, yhat_l) - err(y_l, ref_l))
    dgr = (beta * (1 - 1 / (1 + torch.exp(beta * s.double())))).float().detach()
    r = dgr if sft_weight == "dgr" else torch.full_like(dgr, float(sft_weight))
    numel, n = y_w[0].numel(), len(batch.sample_ids)
    v_w = -2 * (dgr + r).view(-1, 1, 1, 1, 1) * (y_w - yhat_w).detach() / (numel * n)
    v_l = 2 * dgr.view(-1, 1, 1, 1, 1) * (y_l - yhat_l).detach() / (numel * n)
    params = [p for p in policy.parameters()]
    want = torch.autograd.grad([yhat_w, yhat_l], params, grad_outputs=[v_w, v_l])
    names = [n for n, _ in policy.named_parameters()]
    assert out.metrics["s"] == pytest.approx(s.mean().item(), rel=1e-4, abs=1e-7)
    assert out.metrics["dgr"] == pytest.approx(dgr.mean().item(), rel=1e-4)
    for name_, w in zip(names, want):
        assert rel_err(got[name_], w) < 1e-4, name_


def _step(name, pair_mode, reference_kind="copy"):
    cfg, policy, reference = policy_and_reference(name)
    out = PairObjective(FLOW, beta=50.0, sft_weight="dgr", pair_mode=pair_mode).step(
        policy, reference, pair_batch(cfg), step=1)
    return out.loss.detach(), grads(policy)


def _ranks_worker(name):
    parallel.initialize()
    return _step(name, "ranks")


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_batched_sequential_and_ranks_agree(name):
    loss_b, g_b = _step(name, "batched")
    loss_s, g_s = _step(name, "sequential")
    (loss_r0, g_r0), (loss_r1, g_r1) = run_local(_ranks_worker, 2, name)
    assert loss_s.item() == pytest.approx(loss_b.item(), rel=1e-5)
    assert loss_r0.item() == pytest.approx(loss_b.item(), rel=1e-5) and loss_r1.item() == loss_r0.item()
    for k in g_b:
        assert rel_err(g_s[k], g_b[k]) < 1e-5, k
        assert rel_err((g_r0[k] + g_r1[k]) / 2, g_b[k]) < 1e-5, k  # the data-parallel mean


def test_sft_mode_trains_on_winners_only():
    cfg, policy, reference = policy_and_reference("tiny")
    batch = pair_batch(cfg)
    out = PairObjective(FLOW, mode="sft").step(policy, reference, batch, step=0)
    g = grads(policy)
    policy.zero_grad()
    batch.lose = batch.lose * 100
    out2 = PairObjective(FLOW, mode="sft").step(policy, reference, batch, step=0)
    assert out.loss.item() == out2.loss.item() and all(torch.equal(g[k], v) for k, v in grads(policy).items())


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_reference_strategies_give_the_same_errors(name):
    cfg, policy, _ = policy_and_reference(name)
    apply_lora(policy, rank=4, alpha=8)
    refs = {kind: make_reference(kind, policy) for kind in ("adapter", "copy", "copy_offload")}
    with torch.no_grad():  # "training" moves the adapters away from the reference
        for layer in lora_layers(policy):
            layer.lora_B.weight.normal_(0, 0.05)
    batch = pair_batch(cfg)
    objective = PairObjective(FLOW)
    sigma, eps = FLOW.draw(0, batch.sample_ids, batch.win.shape[1:])
    errs = {}
    for kind, ref in refs.items():
        errs[kind] = objective._errors(ref, batch.win, batch.conditions, sigma, eps)
        assert errs[kind].grad_fn is None and not errs[kind].requires_grad  # no graph
    assert torch.allclose(errs["adapter"], errs["copy"], rtol=1e-6) and torch.equal(errs["copy"],
                                                                                    errs["copy_offload"])
    with torch.no_grad():
        policy_err = objective._errors(policy, batch.win, batch.conditions, sigma, eps)
    assert rel_err(policy_err, errs["copy"]) > 1e-4
    offload = refs["copy_offload"]
    assert isinstance(offload, OffloadedCopyReference) and offload.loads == 3 + cfg.is_i2v + cfg.num_layers + 1
    assert not offload.host  # every streamed module was released


def test_adapter_reference_needs_lora():
    _, policy, _ = policy_and_reference("tiny")
    with pytest.raises(ValueError, match="reference=adapter needs a LoRA model"):
        make_reference("adapter", policy)
    with pytest.raises(ValueError, match="reference: expected one of"):
        make_reference("ema", policy)
