"""Start-up decisions of the CUDA paths, on CPU: megatron-core's init flags per layer provider and device."""

import pytest
import torch

from megatron_wan.models.wan21 import preset, specs
from megatron_wan.models.wan21.config import init_flags


def flags(use_cpu, meta, perform):
    return dict(use_cpu_initialization=use_cpu, init_model_with_meta_device=meta, perform_initialization=perform)


@pytest.mark.parametrize("provider, perform, cuda, device, expected", [
    # a random init draws on the CPU path (the same weights for every TP layout), on CPU and CUDA alike
    ("local", True, True, "cpu", flags(True, False, True)),
    ("te", True, True, "cpu", flags(True, False, True)),
    ("local", True, False, "cpu", flags(True, False, True)),
    # loaded weights: allocated on the GPU directly; without CUDA on the CPU
    ("local", False, True, "cpu", flags(False, False, False)),
    ("te", False, True, "cpu", flags(False, False, False)),
    ("local", False, False, "cpu", flags(True, False, False)),
    # a shell on the meta device (the reference copies): megatron's linears through their CPU path, which follows
    # the default device; TE's through device="meta" (under the CPU path TE would allocate a real CPU weight and
    # megatron copy a meta master weight into it)
    ("local", False, True, "meta", flags(True, False, False)),
    ("local", False, False, "meta", flags(True, False, False)),
    ("te", False, True, "meta", flags(False, True, False)),
    ("te", True, True, "meta", flags(False, True, False)),
])
def test_init_flags(provider, perform, cuda, device, expected):
    assert init_flags(provider, perform, cuda, device) == expected


def test_te_copy_on_meta_is_built_with_tes_meta_device(monkeypatch):
    """What a reference copy's config gives megatron-core with Transformer Engine: TE's device is "meta"
    (megatron-core's _get_extra_te_kwargs: "cpu" under use_cpu_initialization, else "meta" under
    init_model_with_meta_device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(specs, "te_usable", lambda: True)
    cfg = preset("tiny", layer_provider="te", perform_initialization=False)
    with torch.device("meta"):
        tconfig = cfg.transformer_config(1, 1)
    assert not tconfig.use_cpu_initialization and tconfig.init_model_with_meta_device
    tconfig = cfg.transformer_config(1, 1)  # the policy, loaded: on the GPU
    assert not tconfig.use_cpu_initialization and not tconfig.init_model_with_meta_device


# -- the start-up peak, before the engine shards: refused by name before loading -----------------------------------

H100 = 81559 * 2**20  # bytes of an H100 80GB (what nvidia-smi reports)


def diffusers_parameters(name: str) -> int:
    """Parameters of diffusers' WanTransformer3DModel for our preset `name` (built on the meta device)."""
    from diffusers import WanTransformer3DModel

    from megatron_wan.models import spec_for_preset

    spec = spec_for_preset(name)
    with torch.device("meta"):
        model = WanTransformer3DModel(**spec.adapter.config_to_diffusers(spec.config(name)))
    return sum(p.numel() for p in model.parameters())


def run_config(overrides: dict):
    """The validated run config of {key: value} overrides (value None: the key left out)."""
    from megatron_wan.config import load_config

    return load_config(None, [f"{k}={v}" for k, v in overrides.items() if v is not None])


FULL_COPY_14B = {"model.preset": "wan2.1-t2v-14b", "run.finetune": "full", "lora": "null",
                 "objective.reference": "copy"}


def test_14b_full_finetuning_with_a_reference_copy_is_refused_on_80gb():
    from megatron_wan.config import ConfigError
    from megatron_wan.memory import GIB, RESERVE_GIB, check_start_up, config_start_up_bytes

    cfg = run_config(FULL_COPY_14B)
    need = config_start_up_bytes(cfg)
    fp32 = 4 * diffusers_parameters("wan2.1-t2v-14b")  # ~57 GB: the policy as loaded, and its copy
    assert need["total"] == 2 * fp32 + RESERVE_GIB * GIB
    with pytest.raises(ConfigError) as refused:
        check_start_up(cfg, H100, "NVIDIA H100 80GB HBM3")
    for key in ("wan2.1-t2v-14b", "objective.reference", "copy_offload", "run.finetune", "run.tensor_parallel",
                "NVIDIA H100 80GB HBM3"):
        assert key in str(refused.value)
    assert "model.expert" not in str(refused.value)
    # the copy in CPU memory, or LoRA (a bf16 base: its fp32 build is the peak), or TP=2: it fits
    for change in ({"objective.reference": "copy_offload"}, {"run.finetune": "lora", "lora": None},
                   {"run.tensor_parallel": "2"}):
        check_start_up(run_config({**FULL_COPY_14B, **change}), H100, "H100")
    lora = config_start_up_bytes(run_config({**FULL_COPY_14B, "run.finetune": "lora", "lora": None}))
    assert lora["built"] == fp32 and fp32 / 2 < lora["policy"] < fp32 / 2 * 1.02  # built fp32, cast to bf16


def test_both_a14b_experts_count_twice():
    from megatron_wan.config import ConfigError
    from megatron_wan.memory import check_start_up, config_start_up_bytes

    full_copy = {**FULL_COPY_14B, "model.preset": "wan2.2-t2v-a14b"}
    one = config_start_up_bytes(run_config({**full_copy, "model.expert": "high_noise"}))
    both = config_start_up_bytes(run_config({**full_copy, "model.expert": "both"}))
    assert both["built"] == 2 * one["built"] == 2 * 4 * diffusers_parameters("wan2.2-t2v-a14b")
    with pytest.raises(ConfigError, match=r"model\.expert") as refused:
        check_start_up(run_config({**full_copy, "model.expert": "both"}), 143771 * 2**20, "H200")
    assert "adapter, with run.finetune lora" in str(refused.value)
    assert "copy_offload" not in str(refused.value)  # it streams one model: not a choice with both experts


def test_planner_counts_the_start_up_peak():
    from megatron_wan.bench import plan

    setup = plan.Setup(preset="wan2.1-t2v-14b", finetune="full", reference="copy", dp_shard=-1, pair_mode="batched",
                       frames=1, height=480, width=832)  # sharded over 8 GPUs
    memory = plan.memory(setup)
    assert memory["total"] < plan.GPUS["h100"].memory < memory["start_up"]  # training fits, the start does not
    assert not memory["fits"] and plan.longest_video(setup) == 0
