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
