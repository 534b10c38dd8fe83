"""WanModel equals diffusers' WanTransformer3DModel on the same random weights (fp32)."""

import pytest
import torch
from wan_reference import assert_forward_matches, assert_gradients_match, inputs, perturbed_reference, rel_err

from megatron_wan.model import WanModel, preset

GRIDS = [(1, 4, 4), (3, 4, 6), (2, 6, 3)]  # latent (f, h, w) after patching; non-square included


@pytest.fixture(scope="module", params=["tiny", "tiny-i2v"])
def pair(request):
    cfg = preset(request.param)
    ref = perturbed_reference(cfg)
    return cfg, ref, WanModel.from_diffusers(ref).eval()


def test_every_reference_parameter_is_perturbed(pair):
    _, ref, _ = pair
    for name, p in ref.named_parameters():
        assert not torch.all(p == 0) and not torch.all(p == 1), name


@pytest.mark.parametrize("grid", GRIDS)
def test_forward_matches_diffusers(pair, grid):
    cfg, ref, ours = pair
    assert_forward_matches(ref, ours, cfg, *inputs(cfg, grid))


def test_gradients_match_diffusers(pair):
    cfg, ref, ours = pair
    assert_gradients_match(ref, ours, cfg, *inputs(cfg, (2, 3, 4)))


def test_timesteps_are_per_sample(pair):
    cfg, _, ours = pair
    x, t, text, clip = inputs(cfg, (1, 2, 2), timesteps=(10.0, 900.0))
    with torch.no_grad():
        both = ours(x, t, text, clip)
        first = ours(x[:1], t[:1], text[:1], None if clip is None else clip[:1])
    assert rel_err(both[:1], first) < 1e-6
    assert rel_err(both[1:], both[:1]) > 1e-2


def test_text_is_used_at_the_length_given():
    cfg = preset("tiny")
    model = WanModel.from_diffusers(perturbed_reference(cfg)).eval()
    x, t, text, _ = inputs(cfg, (1, 2, 2), text_len=20)
    padded = torch.cat([text, torch.zeros(text.shape[0], 5, cfg.text_dim)], dim=1)
    with torch.no_grad():
        assert rel_err(model(x, t, text), model(x, t, padded)) > 1e-4  # padding tokens are attended to


def test_recompute_gives_the_same_gradients():
    cfg = preset("tiny-i2v")
    ref = perturbed_reference(cfg)
    grads = []
    for recompute in (False, True):
        model = WanModel.from_diffusers(ref, recompute=recompute)
        x, t, text, clip = inputs(cfg, (2, 2, 2))
        model(x, t, text, clip).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_bad_inputs_are_named():
    cfg = preset("tiny-i2v")
    model = WanModel(cfg)
    x, t, text, clip = inputs(cfg, (1, 2, 2))
    with pytest.raises(ValueError, match=r"expected \[B, 36, F, H, W\]"):
        model(x[:, :16], t, text, clip)
    with pytest.raises(ValueError, match="clip_emb"):
        model(x, t, text, None)
    with pytest.raises(ValueError, match="not divisible by patch"):
        model(x[..., :3], t, text, clip)
