"""Context parallelism (ring and Ulysses, gloo processes) equals one process: outputs, input and parameter
gradients, whole-video errors and the DPO loss built from them, with frame counts that split evenly and not."""

import pytest
import torch
from pair_fixtures import grads, pair_batch, policy_and_reference
from wan_reference import inputs, perturbed_reference, rel_err

from megatron_wan import parallel
from megatron_wan.model import WanModel, preset
from megatron_wan.models.wan21.adapter import merge_tp
from megatron_wan.models.wan21.rope import rope_cos_sin
from megatron_wan.objectives.flow_matching import FlowMatching, per_sample_error
from megatron_wan.objectives.pair_step import PairObjective
from megatron_wan.objectives.reference import CopyReference
from megatron_wan.parallel.context_parallel import FrameShard
from megatron_wan.parallel.local import run_local

MODELS = ("tiny", "tiny-i2v")
COMMS = ("ring", "ulysses")
FLOW = FlowMatching(shift=3.0, seed=4)


def _batch(cfg, frames):
    return inputs(cfg, (frames, 2, 2), timesteps=(30.0, 700.0), text_len=9)


def _forward_backward(model, batch):
    x, t, text, clip = batch
    x = x.clone().requires_grad_()
    out = model(x, t, text, clip)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weight).sum().backward()
    result = out.detach(), x.grad, grads(model)
    model.zero_grad(set_to_none=True)
    return result


def _errors(model, batch, gather_output):
    """Per-sample errors against a fixed target, from the gathered output or from the local shard."""
    x, t, text, clip = batch
    target = torch.randn(x.shape[0], model.wan.out_dim, *x.shape[2:], generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        if gather_output:
            return per_sample_error(model(x, t, text, clip), target)
        pred, shard = model(x, t, text, clip, gather_output=False)
        assert pred.shape[2] == shard.frames_per_rank  # the prediction really is this rank's frames
        return per_sample_error(pred, target, shard)


def _dpo_step(name, frames):
    policy, reference = policy_and_reference(name)[1:]
    cfg = policy.wan
    out = PairObjective(FLOW, beta=50.0).step(policy, CopyReference(reference), pair_batch(cfg, grid=(frames, 4, 4)), 2)
    return out.loss.detach(), out.metrics, grads(policy)


def _run(names, frames, state_dicts):
    """Every case on this process: {case: (output, input grad, parameter grads)} and DPO steps."""
    results = {}
    for name in names:
        cfg = preset(name)
        for comm in COMMS:
            model = WanModel.from_diffusers(state_dicts[name], num_heads=cfg.num_heads, cp_comm=comm)
            for f in frames:
                batch = _batch(cfg, f)
                results[f"{name}/{comm}/{f}"] = _forward_backward(model, batch)
                results[f"{name}/{comm}/{f}/err"] = _errors(model, batch, gather_output=False)
        for f in frames:
            results[f"{name}/dpo/{f}"] = _dpo_step(name, f)
    return results


def _ulysses_refusal():
    """The error of a Ulysses model with 2 heads, or None when this TP x CP layout can split them."""
    try:
        WanModel(preset("tiny", num_heads=2, cp_comm="ulysses"))
    except ValueError as e:
        return str(e)


def _worker(names, frames, state_dicts, tp, cp):
    parallel.initialize(tensor_parallel=tp, context_parallel=cp)
    results = _run(names, frames, state_dicts)
    results["ulysses_refusal"] = _ulysses_refusal()
    return parallel.tp_rank(), parallel.cp_rank(), results


def _single(names, frames, state_dicts):
    parallel.initialize()
    results = _run(names, frames, state_dicts)
    for name in names:
        cfg = preset(name)
        model = WanModel.from_diffusers(state_dicts[name], num_heads=cfg.num_heads)
        for f in frames:
            results[f"{name}/{f}/err_gathered"] = _errors(model, _batch(cfg, f), gather_output=True)
    return results


def _sum_over_cp(ranks, tp):
    """Per TP rank, the parameter gradients summed over CP ranks (what the CP gradient reduction does)."""
    per_tp = [dict() for _ in range(tp)]
    for tp_rank, _, g in ranks:
        for k, v in g.items():
            per_tp[tp_rank][k] = per_tp[tp_rank].get(k, 0) + v
    return per_tp


@pytest.mark.parametrize("tp,cp,frames", [(1, 2, (4, 3)), (1, 4, (4, 7, 3)), (2, 2, (2, 3))],
                         ids=["cp2", "cp4", "tp2xcp2"])
def test_context_parallel_equals_one_process(tp, cp, frames):
    state_dicts = {name: perturbed_reference(preset(name)).state_dict() for name in MODELS}
    want = _single(MODELS, frames, state_dicts)
    ranks = run_local(_worker, tp * cp, MODELS, frames, state_dicts, tp, cp)
    refusal = ranks[0][2]["ulysses_refusal"]
    if (2 // tp) % cp:
        assert f"{2 // tp} attention heads per tensor-parallel rank" in refusal and "cp_comm=ring" in refusal
    else:
        assert refusal is None
    for name in MODELS:
        cfg = preset(name)
        for f in frames:
            shard = FrameShard((f, 2, 2), 1, cp, cp - 1)
            assert shard.padded == (f % cp != 0)
            out1, dx1, g1 = want[f"{name}/ring/{f}"]  # one process: the plain kernel, no CP
            for comm in COMMS:
                case = f"{name}/{comm}/{f}"
                for _, _, r in ranks:
                    out, _, _ = r[case]
                    assert rel_err(out, out1) < 1e-5, case
                    # whole-video errors from the local shard equal the single-process ones
                    torch.testing.assert_close(r[case + "/err"], want[f"{name}/{f}/err_gathered"], rtol=2e-6, atol=0)
                for _, _, r in ranks:  # the public forward's input is replicated: every rank has its whole gradient
                    assert rel_err(r[case][1], dx1) < 1e-5, case
                summed = _sum_over_cp([(t, c, r[case][2]) for t, c, r in ranks], tp)
                g = merge_tp(summed, cfg) if tp > 1 else summed[0]
                assert sorted(g) == sorted(g1)
                for k in g1:
                    assert rel_err(g[k], g1[k]) < 1e-5, (case, k)
            # the DPO step on local shards: the same whole-video errors, hence the same loss and gradients.
            # s is a difference of four errors ~100x smaller than each, and beta=50 scales it, so fp32
            # summation-order noise (1e-7 of an error) reaches ~1e-5 of the loss: compared at 1e-4.
            loss1, metrics1, dg1 = want[f"{name}/dpo/{f}"]
            errors = [k for k in metrics1 if k.endswith(("_err_w", "_err_l"))]
            for _, _, r in ranks:
                loss, metrics, _ = r[f"{name}/dpo/{f}"]
                assert [metrics[k] for k in errors] == pytest.approx([metrics1[k] for k in errors], rel=2e-6)
                assert loss.item() == pytest.approx(loss1.item(), rel=1e-4), (name, f)
                assert metrics == pytest.approx(metrics1, rel=1e-4, abs=1e-6)
            summed = _sum_over_cp([(t, c, r[f"{name}/dpo/{f}"][2]) for t, c, r in ranks], tp)
            g = merge_tp(summed, preset(name, num_layers=1)) if tp > 1 else summed[0]
            for k in dg1:
                assert rel_err(g[k], dg1[k]) < 1e-4, (name, f, k)


def test_frame_shards_pad_the_tail_and_slice_rope():
    """21 latent frames over CP=4: 6, 6, 6 and 3 real frames, each rank 6 long; RoPE rows are the whole video's."""
    shards = [FrameShard((21, 3, 5), 1, 4, r) for r in range(4)]
    assert [s.valid_frames() for s in shards] == [6, 6, 6, 3] and all(s.padded for s in shards)
    x = torch.randn(2, 16, 21, 6, 10)
    parts = [s.local_latents(x) for s in shards]
    assert all(p.shape == (2, 16, 6, 6, 10) for p in parts)
    assert torch.equal(torch.cat(parts, 2)[:, :, :21], x) and not parts[3][:, :, 3:].any()
    full_cos, full_sin = rope_cos_sin((24, 3, 5), 48)
    cos, sin = rope_cos_sin(shards[2].local_grid, 48, frame_offset=shards[2].first_frame)
    rows = slice(12 * 15, 18 * 15)
    assert torch.equal(cos, full_cos[rows]) and torch.equal(sin, full_sin[rows])
    even = FrameShard((8, 2, 2), 1, 4, 1)
    assert not even.padded and even.valid_frames() == 2 and even.first_frame == 2
