"""What diffusers keeps in float32 (WanTransformer3DModel._keep_in_fp32_modules) stays float32 in every cast of ours:
the sampler's model dtype, LoRA's frozen bf16 base and FSDP2's bf16 compute copies."""

import torch
from diffusers import WanTransformer3DModel
from wan_reference import inputs

from megatron_wan.models.wan21 import WanModel
from megatron_wan.models.wan21.adapter import rename
from megatron_wan.models.wan21.lora import apply_lora
from megatron_wan.models.wan21.precision import cast_parameters, fp32_parameters
from megatron_wan.parallel.parallelize import data_parallel_mesh, parallelize

BF16, FP32 = torch.bfloat16, torch.float32


def kept_by_diffusers(folder) -> set:
    """Names of the parameters diffusers' own loader keeps in float32 when asked for bf16."""
    ref = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=BF16)
    return {n for n, p in ref.named_parameters() if p.dtype == FP32}


def test_sampler_dtype_keeps_what_diffusers_keeps(models):
    """WanModel in bf16 (the sampler's `params_dtype`) keeps diffusers' float32 parameters, loaded exactly, and
    runs without autocast."""
    expected = kept_by_diffusers(models["i2v"])
    assert any("time_embedder" in n for n in expected) and any("scale_shift_table" in n for n in expected)
    exact = WanModel.from_diffusers(models["i2v"])
    model = WanModel.from_diffusers(models["i2v"], params_dtype=BF16)
    kept = {rename(n, "diffusers") for n, p in model.named_parameters() if p.dtype == FP32}
    assert kept == expected
    assert {p.dtype for n, p in model.named_parameters() if rename(n, "diffusers") not in kept} == {BF16}
    for (name, p), q in zip(model.named_parameters(), exact.parameters()):
        if p.dtype == FP32:
            assert torch.equal(p, q), name
    x, t, text, clip = inputs(model.wan, (1, 2, 2))
    with torch.no_grad():
        assert model(x.to(BF16), t, text.to(BF16), clip.to(BF16)).dtype == BF16


def test_lora_frozen_base_cast_keeps_them(models):
    model = apply_lora(WanModel.from_diffusers(models["i2v"]), 4, 8.0)
    cast_parameters(model, BF16, [p for p in model.parameters() if not p.requires_grad])  # what the trainer does
    keep = fp32_parameters(model)
    assert keep and all(p.dtype == FP32 for p in keep)
    for name, p in model.named_parameters():
        assert p.dtype == (FP32 if p in keep or p.requires_grad else BF16), name


def test_fsdp_computes_them_in_fp32(models):
    """Under FSDP2's bf16 param_dtype the forward sees the float32 parameters in float32, the others in bf16."""
    model = WanModel.from_diffusers(models["i2v"])
    keep = {n for n, p in model.named_parameters() if p in fp32_parameters(model)}
    parallelize(model, data_parallel_mesh(1), dtype="bf16", keep_fp32=fp32_parameters(model))
    seen = {}

    def record(prefix):
        def hook(module, _inputs):
            for name, p in module.named_parameters(recurse=False):
                seen[f"{prefix}.{name}" if prefix else name] = p.dtype
        return hook

    for prefix, module in model.named_modules():
        module.register_forward_pre_hook(record(prefix))
    x, t, text, clip = inputs(model.wan, (1, 2, 2))
    with torch.no_grad(), torch.autocast("cpu", BF16):
        model(x, t, text, clip)
    assert keep and set(seen) == {n for n, _ in model.named_parameters()}
    for name, dtype in seen.items():
        assert dtype == (FP32 if name in keep else BF16), name
