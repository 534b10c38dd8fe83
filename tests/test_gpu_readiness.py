"""The decisions around the CUDA-only paths (Transformer Engine, flash-attn, TE's CP, CUDA init and peaks), on CPU.

Each test reproduces one defect that reading TE / flash-attn / megatron-core's sources found (issue: GPU readiness);
TE classes are replaced by stand-ins with TE's constructor signature where a build is needed.
"""

import sys
import threading
import types
import typing

import pytest
import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn
from wan_reference import inputs, perturbed_reference, rel_err

from megatron_wan import parallel, throughput
from megatron_wan.config import ConfigError, load_config, validate
from megatron_wan.models.wan21 import WanModel, attention, preset, specs
from megatron_wan.models.wan21.adapter import from_ours, merge_tp
from megatron_wan.models.wan21.lora import apply_lora, lora_layers
from megatron_wan.objectives.reference import make_reference
from megatron_wan.parallel import context_parallel as cp
from megatron_wan.parallel.context_parallel import FrameShard
from megatron_wan.parallel.local import run_local

BF16, FP32 = torch.bfloat16, torch.float32


class StandInTELayerNorm(nn.LayerNorm):
    """transformer_engine.pytorch.LayerNorm's constructor (normalized_shape, eps, ..., device, dtype) on torch's."""

    def __init__(self, normalized_shape, eps=1e-5, sequence_parallel=None, params_dtype=None,
                 zero_centered_gamma=False, device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, device=device, dtype=dtype)


def _stand_in_te(monkeypatch, norm=StandInTELayerNorm):
    monkeypatch.setattr(specs, "te_classes", lambda: (specs.LocalColumnLinear, specs.LocalRowLinear, norm))
    monkeypatch.setattr(specs, "te_usable", lambda: True)


def _spec_leaves(spec):
    """Every module entry of a ModuleSpec tree."""
    yield spec.module
    subs = spec.submodules
    for value in (vars(subs).values() if subs is not None else ()):
        if isinstance(value, ModuleSpec):
            yield from _spec_leaves(value)
        elif not isinstance(value, dict):
            yield value


# -- 1. the TE spec builds modules only, and conversion drops nothing ------------------------------------

def test_te_spec_builds_only_modules(monkeypatch):
    _stand_in_te(monkeypatch)
    spec = specs.te_block_spec()
    assert not [leaf for leaf in _spec_leaves(spec) if isinstance(leaf, types.FunctionType)]
    parallel.initialize()
    cfg = preset("tiny-i2v")
    block = build_module(spec, config=cfg.transformer_config(1, 1), wan=cfg)
    for name in typing.get_type_hints(specs.WanBlockSubmodules):
        if name != "extra":
            built = getattr(block, {"adaln_norm": "norm1"}.get(name, name))
            assert isinstance(built, nn.Module), name
    assert isinstance(block.cross_norm, StandInTELayerNorm)
    assert sorted(n for n, _ in block.cross_norm.named_parameters()) == ["bias", "weight"]


def test_te_spec_model_loads_cross_norm_and_equals_local(monkeypatch):
    _stand_in_te(monkeypatch)
    cfg = preset("tiny")
    ref = perturbed_reference(cfg)
    te, local = (WanModel.from_diffusers(ref, layer_provider=p).eval() for p in ("te", "local"))
    assert torch.equal(te.blocks[1].cross_norm.weight, ref.blocks[1].norm2.weight)
    x, t, text, clip = inputs(cfg, (2, 2, 3))
    with torch.no_grad():
        assert rel_err(te(x, t, text, clip), local(x, t, text, clip)) < 1e-6


class NoParameterNorm(nn.Module):
    """A cross norm holding no weights: what a spec entry that is not a module class amounts to."""

    def __init__(self, dim, eps, elementwise_affine=True, **te_kwargs):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)


def test_conversion_refuses_unexpected_keys_both_ways(monkeypatch):
    cfg = preset("tiny")
    ref = perturbed_reference(cfg)
    ours = WanModel.from_diffusers(ref).state_dict()
    with pytest.raises(KeyError, match="blocks.0.extra_scale"):
        from_ours({**ours, "blocks.0.extra_scale": torch.ones(1)}, cfg, "diffusers")
    _stand_in_te(monkeypatch, NoParameterNorm)  # checkpoint -> a model that has nowhere to put cross_norm
    with pytest.raises(KeyError, match=r"blocks\.0\.cross_norm\.weight"):
        WanModel.from_diffusers(ref, layer_provider="te")


# -- 2. cp_comm=te never auto-picked for a video TE's CP refuses; explicit choices refused before the model ------

SHARD_81_FRAMES_CP4 = FrameShard((21, 30, 52), 1, 4, 0)  # 480p, 81 frames = 21 latent frames: 6/6/6/3


def test_auto_cp_comm_never_picks_te_for_a_video_it_refuses():
    assert cp.resolve_cp_comm("auto", "te") == "ring"  # TE's CP has not passed gpu_check
    built = cp.resolve_cp_comm("auto", "te", verified=("te",))
    assert built == "te"
    assert cp.cp_comm_for_call(built, "auto", SHARD_81_FRAMES_CP4, 128, BF16) == "ring"
    assert cp.cp_comm_for_call(built, "auto", FrameShard((24, 30, 52), 1, 4, 0), 128, BF16) == "te"
    assert cp.cp_comm_for_call(built, "auto", FrameShard((24, 30, 52), 1, 4, 0), 128, FP32) == "ring"
    with pytest.raises(ValueError, match="21 token frames"):
        cp.cp_comm_for_call("te", "te", SHARD_81_FRAMES_CP4, 128, BF16)


def test_te_cp_problems():
    assert cp.te_cp_problem(4, 24, 30 * 52, 128, BF16) is None
    assert "split evenly" in cp.te_cp_problem(8, 21, 30 * 52, 128, BF16)  # eval sample: CP = world size = 8
    assert "even number" in cp.te_cp_problem(2, 2, 3 * 3, 128, BF16)  # 9 tokens per rank
    assert "fp16/bf16" in cp.te_cp_problem(2, 2, 4, 128, FP32)
    assert "multiple of 8" in cp.te_cp_problem(2, 2, 4, 12, BF16)


def test_validate_refuses_a_cp_comm_that_cannot_run_the_data():
    te = ["model.cp_comm=te", "model.attention_backend=te", "run.context_parallel=4",
          "model.preset=wan2.1-t2v-14b"]
    cfg = load_config(None, te)
    validate(cfg, 4, [(16, 24, 60, 104)])
    with pytest.raises(ConfigError, match="model.cp_comm.*21 token frames"):
        validate(cfg, 4, [(16, 24, 60, 104), (16, 21, 60, 104)])
    with pytest.raises(ConfigError, match="model.cp_comm.*fp16/bf16"):
        load_config(None, [*te, "run.dtype=fp32"])
    with pytest.raises(ConfigError, match="model.cp_comm.*attention_backend=te"):
        load_config(None, ["model.cp_comm=te", "run.context_parallel=2"])
    with pytest.raises(ConfigError, match=r"model.cp_comm: ulysses needs the heads per TP rank \(40\) divisible"):
        load_config(None, ["model.cp_comm=ulysses", "run.context_parallel=3", "model.preset=wan2.1-t2v-14b"])
    validate(load_config(None, ["model.cp_comm=auto", "run.context_parallel=4"]), 4, [(16, 21, 60, 104)])


# -- 3. the kernel Ulysses calls is built for the heads it sees ------------------------------------------------

def test_ulysses_kernel_heads():
    assert cp.kernel_heads(40, 4, "ulysses") == 10
    assert cp.kernel_heads(40, 4, "ring") == cp.kernel_heads(40, 4, "te") == cp.kernel_heads(40, 1, "ulysses") == 40


def test_te_attention_for_ulysses_is_built_for_heads_over_cp(monkeypatch):
    built = []

    class StandInDotProductAttention(nn.Module):
        def __init__(self, num_attention_heads, kv_channels, **kwargs):
            super().__init__()
            built.append(num_attention_heads)

    te = types.ModuleType("transformer_engine")
    te.pytorch = types.SimpleNamespace(DotProductAttention=StandInDotProductAttention)
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te.pytorch)
    monkeypatch.setattr(attention, "resolve_backend", lambda name, verified=None: name)
    monkeypatch.setattr(parallel, "cp_size", lambda: 4)
    attention.CoreAttention("te", 40, 128, "ulysses")
    attention.CoreAttention("te", 40, 128, None)  # cross-attention: never sharded
    assert built == [10, 40]


# -- 4. backends by dtype and device; auto only from what passed gpu_check ---------------------------------------

def test_kernel_per_call_follows_dtype_and_device():
    assert attention.kernel_for_call("flash", BF16, "cuda", 128) == "flash"
    assert attention.kernel_for_call("te", torch.float16, "cuda", 128) == "te"
    assert attention.kernel_for_call("flash", FP32, "cuda", 128) == "sdpa"  # flash-attn raises on fp32
    assert attention.kernel_for_call("te", FP32, "cuda", 128) == "sdpa"  # TE would hold the whole score matrix
    assert attention.kernel_for_call("te", BF16, "cpu", 128) == "sdpa"
    assert attention.kernel_for_call("sdpa", FP32, "cuda", 128) == "sdpa"


def test_auto_picks_only_gpu_verified_backends(monkeypatch):
    monkeypatch.setattr(attention, "_usable", lambda backend: True)
    monkeypatch.setattr(specs, "te_usable", lambda: True)
    assert attention.resolve_backend("auto") == "sdpa"
    assert specs.resolve_provider("auto") == "local"
    assert attention.resolve_backend("auto", verified=("flash",)) == "flash"
    assert attention.resolve_backend("auto", verified=("flash", "te")) == "te"
    assert specs.resolve_provider("auto", verified=("te",)) == "te"
    assert attention.VERIFIED_ON_GPU == {"attention_backend": (), "layer_provider": (), "cp_comm": ()}


# -- 5. devices default to the rank's CUDA device ------------------------------------------------------------------

def test_default_device_is_the_ranks_cuda_device(monkeypatch):
    assert parallel.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)
    assert parallel.default_device() == torch.device("cuda", 3)
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert parallel.default_device() == torch.device("cuda", 2)


def test_sampler_defaults_to_the_default_device(monkeypatch):
    import dataclasses

    from megatron_wan import sampling
    from megatron_wan.models import get_model_spec

    seen = []

    class Stop(Exception):
        pass

    def encoders(model_dir, task, device, dtype, offload):
        seen.append(device)
        raise Stop

    spec = dataclasses.replace(get_model_spec("wan2.1"), conditioner=encoders)
    monkeypatch.setattr(sampling, "spec_for_folder", lambda folder: spec)
    monkeypatch.setattr(parallel, "default_device", lambda: torch.device("cuda", 5))
    with pytest.raises(Stop):
        sampling.WanSampler("folder")
    assert seen == [torch.device("cuda", 5)]


# -- 6. the reference copy is built, not deep-copied -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["copy", "copy_offload"])
def test_reference_copy_without_deepcopy(kind):
    cfg = preset("tiny-i2v")
    model = WanModel.from_diffusers(perturbed_reference(cfg))
    apply_lora(model, 4, 8.0)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.weight.normal_()  # adapters that change the output
    model.blocks[0].self_attention.core_attention.stream = threading.Lock()  # like TE's CUDA stream: no deepcopy
    reference = make_reference(kind, model)
    x, t, text, clip = inputs(cfg, (2, 2, 2))
    with torch.no_grad():
        assert torch.equal(reference(x, t, text, clip), model(x, t, text, clip))
    assert not any(p.requires_grad for p in reference.model.parameters())
    assert reference.model.blocks[0].self_attention.linear_q.base_layer.weight.data_ptr() != \
        model.blocks[0].self_attention.linear_q.base_layer.weight.data_ptr()


# -- 7. random init: the same weights for every TP layout and device ----------------------------------------------

def test_random_init_takes_megatrons_cpu_path_on_cuda_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preset("tiny").transformer_config(1, 2).use_cpu_initialization  # not the per-TP-rank CUDA tracker
    assert not preset("tiny", perform_initialization=False).transformer_config(1, 2).use_cpu_initialization
    with torch.device("meta"):
        assert preset("tiny", perform_initialization=False).transformer_config(1, 2).use_cpu_initialization


def random_state(tensor_parallel: int, seed: int) -> dict:
    parallel.initialize(tensor_parallel)
    torch.manual_seed(seed)  # what train.build_model does with model.init_seed
    return {k: v for k, v in WanModel(preset("tiny")).state_dict().items() if not k.endswith("_extra_state")}


def test_random_init_is_the_same_for_tp1_and_tp2():
    one = random_state(1, 3)
    two = merge_tp(run_local(random_state, 2, 2, 3), preset("tiny"))
    assert sorted(one) == sorted(two)
    for name in one:
        assert torch.equal(one[name], two[name]), name
    assert not torch.equal(random_state(1, 4)["blocks.0.mlp.linear_fc1.weight"], one["blocks.0.mlp.linear_fc1.weight"])


# -- 8. the fp32 peak is TF32's only with TF32 on ------------------------------------------------------------------

def test_fp32_peak_follows_the_tf32_setting(monkeypatch):
    h100 = "NVIDIA H100 80GB HBM3"
    assert throughput.table_peak(h100, FP32, tf32=False)[0] == 66.9e12
    assert throughput.table_peak(h100, FP32, tf32=True)[0] == 494.7e12
    assert throughput.table_peak(h100, BF16, tf32=False)[0] == 989.4e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: h100)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # what a run with run.tf32=false leaves
        peak, source = throughput.peak_flops(FP32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert peak == 66.9e12 and "TF32 off" in source
    assert load_config(None, ["run.tf32=true"]).run.tf32 is True


# -- gpu_check: what runs where, and its CPU behaviour -----------------------------------------------------------

def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0(capsys):
    from megatron_wan.bench import gpu_check

    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [gpu_check.NO_CUDA]
    assert gpu_check.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert listed == [s.name for s in gpu_check.STEPS] and "parity:te+te" in listed and "throughput" in listed


def test_gpu_check_decisions():
    from megatron_wan.bench import gpu_check

    steps = {s.name: s for s in gpu_check.STEPS}
    assert gpu_check.skip_reason(steps["cp2:ring"], 1, set()) == "needs 2 GPUs, 1 present"
    assert gpu_check.skip_reason(steps["parity:te+flash"], 1, {"transformer_engine"}) == "flash_attn not installed"
    assert gpu_check.skip_reason(steps["parity:te+flash"], 1, {"transformer_engine", "flash_attn"}) is None
    assert gpu_check.skip_reason(steps["parity:local+sdpa"], 1, set()) is None
    assert gpu_check.within(0.019, 0.01) and not gpu_check.within(0.021, 0.01) and not gpu_check.within(
        float("nan"), 0.01)
    results = [{"step": "a", "status": "ran", "ok": True, "rows": [gpu_check._row("x", 1.0, 2.0)]},
               {"step": "b", "status": "ran", "ok": False, "rows": [gpu_check._row("y", 3.0, 2.0, False)]},
               {"step": "c", "status": "error", "reason": "RuntimeError: boom", "rows": []},
               {"step": "d", "status": "skip", "reason": "needs 2 GPUs, 1 present", "rows": []}]
    assert gpu_check.failures(results) == 2
    text = gpu_check.table(results)
    assert "FAIL" in text and "ERROR: RuntimeError: boom" in text and "SKIP: needs 2 GPUs" in text


def test_gpu_check_training_data_and_memory_plan(tmp_path):
    from megatron_wan.bench import gpu_check
    from megatron_wan.data.datasets import PairDataset

    dataset = PairDataset(gpu_check.write_pairs(tmp_path, preset("tiny")), text_len=16)
    assert dataset.task == "t2v" and len(dataset) == 2 and dataset.shapes == [(16, 3, 8, 12)] * 2
    assert dataset[1]["winner_latent"].shape == (16, 3, 8, 12) and dataset[1]["text_emb"].shape == (16, 32)
    two = gpu_check.planned_memory(preset="wan2.1-t2v-1.3b", height=480, width=832, frames=81, gpus=1, cp=1,
                                   finetune="full", reference="copy", recompute=False, pair_mode="batched")
    assert 0 < two < 80 * 2**30
