"""parallel.initialize in a plain process, and the attention backend switch."""

import importlib.util

import pytest
import torch

from megatron_wan import parallel
from megatron_wan.model import WanConfig, preset
from megatron_wan.models.wan21.attention import CoreAttention, resolve_backend


def test_initialize_is_idempotent_and_refuses_other_sizes():
    parallel.initialize()
    parallel.initialize(tensor_parallel=1, context_parallel=1)  # no-op
    assert parallel.is_initialized() and parallel.tp_size() == 1 and parallel.cp_size() == 1
    with pytest.raises(RuntimeError, match="already initialized with tensor_parallel=1"):
        parallel.initialize(tensor_parallel=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto prefers te / flash on CUDA")
def test_auto_backend_on_cpu_is_sdpa():
    assert resolve_backend("auto") == "sdpa"


@pytest.mark.parametrize("backend,package", [("flash", "flash-attn"), ("te", "transformer-engine")])
def test_absent_backend_is_an_error_naming_the_package(backend, package):
    module = {"flash": "flash_attn", "te": "transformer_engine"}[backend]
    if importlib.util.find_spec(module) is not None and torch.cuda.is_available():
        pytest.skip(f"{package} is installed here")
    with pytest.raises((ImportError, RuntimeError), match=package if importlib.util.find_spec(module) is None
                       else "CUDA"):
        CoreAttention(backend, 2, 8)


def test_sdpa_core_attention_is_softmax_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 2, 3, 8), torch.randn(6, 2, 3, 8), torch.randn(6, 2, 3, 8)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / 8**0.5
    expected = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v).reshape(5, 2, 24)
    assert torch.allclose(CoreAttention("sdpa", 3, 8)(q, k, v), expected, atol=1e-6)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="image_dim"):
        WanConfig(model_type="i2v")
    with pytest.raises(ValueError, match="attention_backend"):
        preset("tiny", attention_backend="xformers")
    with pytest.raises(TypeError, match="unknown WanConfig field"):
        preset("tiny", hidden=3)
