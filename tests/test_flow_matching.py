"""Wan's rectified flow: the shift against diffusers' scheduler, noising, shared and resumable draws."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from megatron_wan.objectives.flow_matching import FlowMatching, per_sample_error, shift_sigma


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_shift_equals_diffusers_scheduler(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unshifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    assert torch.allclose(shift_sigma(unshifted.sigmas, shift), sched.sigmas, atol=1e-6)
    assert torch.allclose(FlowMatching(shift=shift).model_timestep(sched.sigmas), sched.timesteps, atol=1e-3)


def test_noising_and_target():
    fm = FlowMatching()
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xt, v = fm.noised(x0, sigma, eps)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.5 * x0[1] + 0.5 * eps[1])
    assert torch.equal(v, eps - x0)
    # x_t moves along v and reaches eps at sigma = 1
    assert torch.allclose(xt + (1 - sigma.view(-1, 1, 1, 1, 1)) * v, eps, atol=1e-6)


def test_draws_are_a_function_of_seed_step_and_sample_id():
    fm = FlowMatching(seed=3)
    s1, e1 = fm.draw(step=7, sample_ids=[11, 12, 11], latent_shape=(4, 2, 2, 2))
    assert torch.equal(s1[0], s1[2]) and torch.equal(e1[0], e1[2])  # a pair's two members share t and eps
    assert not torch.equal(e1[0], e1[1])
    s2, e2 = fm.draw(step=7, sample_ids=[12], latent_shape=(4, 2, 2, 2))  # another batch composition
    assert torch.equal(s2[0], s1[1]) and torch.equal(e2[0], e1[1])
    s3, _ = fm.draw(step=8, sample_ids=[12], latent_shape=(4, 2, 2, 2))
    assert not torch.equal(s3, s2)
    s4, _ = FlowMatching(seed=4).draw(step=7, sample_ids=[12], latent_shape=(4, 2, 2, 2))
    assert not torch.equal(s4, s2)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_timestep_distributions(sampling):
    fm = FlowMatching(shift=1.0, timestep_sampling=sampling)
    t, _ = fm.draw(0, range(4000), (1,))
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    # logit-normal concentrates in the middle: fewer draws in the outer tenths than uniform's 20%
    outer = ((t < 0.1) | (t > 0.9)).float().mean().item()
    assert (outer < 0.1) if sampling == "logit_normal" else (0.17 < outer < 0.23)
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatching(timestep_sampling="cosine")


def test_per_sample_error_is_the_mean_over_all_elements():
    pred, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    target[1] *= 2
    assert torch.equal(per_sample_error(pred, target), torch.tensor([1.0, 4.0]))
