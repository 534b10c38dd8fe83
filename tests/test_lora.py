"""LoRA on the parallel linears: B=0 starts at the base model; TP=2 equals TP=1 with adapters on."""

import pytest
import torch
from wan_reference import inputs, perturbed_reference, rel_err

from megatron_wan import parallel
from megatron_wan.model import WanModel, preset
from megatron_wan.models.wan21.lora import apply_lora, disable_adapter, load_lora_state_dict, lora_state_dict
from megatron_wan.parallel.local import run_local

TARGETS = ("linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1", "linear_fc2", "linear_k_img")


def lora_forward_backward(cfg, state_dict, lora, batch, tensor_parallel=1):
    parallel.initialize(tensor_parallel=tensor_parallel)
    model = apply_lora(WanModel.from_diffusers(state_dict, num_heads=cfg.num_heads), rank=4, alpha=8,
                       targets=TARGETS)
    load_lora_state_dict(model, lora)
    x, t, text, clip = batch
    out = model(x, t, text, clip)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def random_lora(cfg, state_dict):
    model = apply_lora(WanModel.from_diffusers(state_dict, num_heads=cfg.num_heads), rank=4, alpha=8,
                       targets=TARGETS)
    torch.manual_seed(2)
    return {k: torch.randn_like(v) * 0.1 for k, v in lora_state_dict(model).items()}


def test_fresh_adapters_leave_the_model_unchanged_and_only_they_train():
    cfg = preset("tiny-i2v")
    ref = perturbed_reference(cfg)
    base = WanModel.from_diffusers(ref)
    model = apply_lora(WanModel.from_diffusers(ref), rank=4, alpha=8)
    x, t, text, clip = inputs(cfg, (1, 2, 2))
    with torch.no_grad():  # equal up to rounding: megatron multiplies a frozen weight by another kernel
        assert rel_err(model(x, t, text, clip), base(x, t, text, clip)) < 1e-6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    load_lora_state_dict(model, random_lora(cfg, ref.state_dict()))
    with torch.no_grad():
        assert rel_err(model(x, t, text, clip), base(x, t, text, clip)) > 1e-3
        with disable_adapter(model):
            assert rel_err(model(x, t, text, clip), base(x, t, text, clip)) < 1e-6


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_lora_tp2_equals_tp1(name):
    cfg = preset(name)
    sd = perturbed_reference(cfg).state_dict()
    lora = random_lora(cfg, sd)
    batch = inputs(cfg, (2, 2, 2), timesteps=(100.0, 600.0))
    out1, g1 = lora_forward_backward(cfg, sd, lora, batch)
    ranks = run_local(lora_forward_backward, 2, cfg, sd, lora, batch, 2)
    for out, _ in ranks:
        assert rel_err(out, out1) < 1e-5
    for k, want in g1.items():
        parts = [g[k] for _, g in ranks]
        if parts[0].shape == want.shape:  # replicated: every rank has the whole gradient
            assert all(rel_err(p, want) < 1e-5 for p in parts), k
        else:
            dim = 0 if ".lora_B." in k else 1
            assert rel_err(torch.cat(parts, dim=dim), want) < 1e-5, k
