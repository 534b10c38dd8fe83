"""GPU readiness, round 2: the decisions of the CUDA paths added with FSDP2, DCP, compile and Wan 2.2, on CPU.

Each test reproduces one defect found by reading the libraries' sources (torch, DeepSpeed, Transformer Engine) against
ours; where a library is absent here the decision is a plain function, tested with the values it would see.
"""

import pytest
import torch
from test_hardening import _cp_input_grads
from wan_reference import inputs, perturbed_reference, rel_err

from megatron_wan import throughput
from megatron_wan.bench import gpu_check
from megatron_wan.model import preset
from megatron_wan.parallel import context_parallel as cp
from megatron_wan.parallel.context_parallel import FrameShard
from megatron_wan.parallel.local import run_local

BF16, FP32 = torch.bfloat16, torch.float32


# -- 1. gpu_check's CP steps: one rank's input gradient, every rank agreeing ------------------------------------

def test_gpu_check_takes_one_ranks_input_gradient_of_a_cp_run():
    cfg = preset("tiny")
    ref = perturbed_reference(cfg)
    x, t, text, _ = inputs(cfg, (3, 2, 2), timesteps=(30.0, 700.0), text_len=9)
    x, text = x.requires_grad_(), text.requires_grad_()
    out = ref(x, t, text, return_dict=False)[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ((out * weight).sum() + (x ** 2).sum() + text.sum()).backward()
    ranks = run_local(_cp_input_grads, 2, ref.state_dict(), 2, env={"OMP_NUM_THREADS": "1"})  # gloo, CP=2
    dx, spread = gpu_check.input_grad([r[0] for r in ranks])
    assert rel_err(dx, x.grad) < 1e-5 and spread == 0.0
    # a rank whose gradient differs is reported by how much
    assert gpu_check.input_grad([ranks[0][0], 2 * ranks[1][0]])[1] == pytest.approx(1.0)


# -- gpu_check: every step that reads the baseline waits for it; cp2:te's auto row goes through the fallback -----

def test_gpu_check_steps_reading_the_baseline_need_it():
    import inspect

    steps = {s.name: s for s in gpu_check.STEPS}
    reading = [name for name, run in gpu_check.RUNNERS.items() if 'ctx["baseline"]' in inspect.getsource(run)]
    assert "compile" in reading and "cp2:ring" in reading
    for name in reading:
        assert gpu_check.skip_reason(steps[name], 8, {"transformer_engine", "flash_attn"}, baseline=False) == \
            "needs the baseline step's errors (it failed or was not run)", name
    assert gpu_check.skip_reason(steps["compile"], 1, set(), baseline=True) is None
    assert gpu_check.skip_reason(steps["environment"], 1, set(), baseline=False) is None


def test_gpu_check_cp_te_rows_take_the_paths_they_name():
    """cp2:te's cases, through the decisions the model makes: built for TE's CP, then per call."""
    taken = {}
    for label, cp_comm, frames, verified, built in gpu_check.CP_TE_CASES:
        assert cp.resolve_cp_comm(cp_comm, "te", verified) == built, label
        shard = FrameShard((frames, *gpu_check.GRIDS["t2v"][1:]), 1, size=2)
        head_dim = gpu_check.check_config("t2v").head_dim
        try:
            taken[label] = cp.cp_comm_for_call(built, cp_comm, shard, head_dim, BF16)
        except ValueError as e:
            taken[label] = "refused" if "token frames do not split evenly" in str(e) else str(e)
    assert taken == {"te": "te", "te refuses": "refused", "auto->ring": "ring"}


# -- peaks by the device's product name ------------------------------------------------------------------------

@pytest.mark.parametrize("device, product, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4e12, 66.9e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5e12, 51.2e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5e12, 60e12),
    ("NVIDIA H200", "H200 SXM", 989.4e12, 66.9e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5e12, 60e12),
    ("NVIDIA H800 PCIe", "H800 PCIe", 756.5e12, 51.2e12),
    ("NVIDIA GH200 480GB", "GH200", 989.4e12, 66.9e12),
    ("NVIDIA A100-PCIE-40GB", "A100", 312e12, 19.5e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12, 19.5e12),
])
def test_peak_is_the_products(device, product, bf16, fp32):
    assert throughput.product_name(device) == product
    peak, source = throughput.table_peak(device, BF16, tf32=False)
    assert peak == bf16 and product in source
    assert throughput.table_peak(device, FP32, tf32=False)[0] == fp32


def test_no_peak_for_a_gpu_not_in_the_table():
    for device in ("NVIDIA H20", "NVIDIA GeForce RTX 4090"):  # H20: not an H200
        assert throughput.product_name(device) is None
        peak, source = throughput.table_peak(device, BF16, tf32=False)
        assert peak != peak and "no table value" in source


# -- 4. a resume after changing the layer provider: no `_extra_state` in the DCP checkpoint ----------------------

class _TELikeLinear(torch.nn.Linear):
    """A linear with Transformer Engine's extra state without FP8 (module/base.py: get_extra_state returns an empty
    uint8 tensor, set_extra_state ignores one)."""

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        pass


def _resume_with_te_like_modules(out):
    """Train a step with plain linears, save; resume with a model whose first linear carries TE's extra state (and
    the other way round); the weights loaded, and whether `_extra_state` reached the checkpoint."""
    from test_hardening import _TwoBlocks

    from megatron_wan import parallel
    from megatron_wan.config import load_config
    from megatron_wan.engines import build_engine

    parallel.initialize()
    cfg = load_config(None, ["run.engine=megatron", "run.dtype=fp32", "run.finetune=full", "lora=null",
                             "objective.reference=copy", "optim.lr=0.1"])

    def engine(te_like: bool):
        torch.manual_seed(0)
        model = _TwoBlocks()
        if te_like:
            model.blocks[0] = _TELikeLinear(8, 8)
        return build_engine(cfg, model)

    results = []
    for saved_with, resumed_with in ((False, True), (True, False)):
        first = engine(saved_with)
        first.backward(first.model(torch.ones(2, 8)).pow(2).mean())
        first.step(0.1)
        first.save(f"{out}/{saved_with}")
        trained = {k: v.full_tensor().clone() for k, v in first.model.state_dict().items() if "weight" in k}
        second = engine(resumed_with)
        second.load(f"{out}/{saved_with}")
        loaded = {k: v.full_tensor() for k, v in second.model.state_dict().items() if "weight" in k}
        results.append(all(torch.equal(trained[k], loaded[k]) for k in trained))
    return results, [k for k in first._state()["tp00"]["model"] if k.endswith("_extra_state")]


def test_resume_after_changing_to_te_modules(tmp_path):
    (loaded, extra), = run_local(_resume_with_te_like_modules, 1, str(tmp_path), env={"OMP_NUM_THREADS": "1"})
    assert loaded == [True, True] and extra == []


# -- 6. the real minimum torch, checked at start-up ------------------------------------------------------------

def test_torch_version_check_names_the_minimum():
    from megatron_wan import MIN_TORCH, torch_version_problem

    assert MIN_TORCH == "2.7"  # torch._dynamo.config.recompile_limit: torch 2.6 has only cache_size_limit
    problem = torch_version_problem("2.6.0+cu124")
    assert "torch >= 2.7" in problem and "2.6.0+cu124" in problem and "recompile_limit" in problem
    assert torch_version_problem("2.4.1") is not None and torch_version_problem("1.13.1") is not None
    for ok in ("2.7.0", "2.7.0a0+7c8ec84dab.nv25.03", "2.10.1", "2.13.0+cpu", "3.0.0"):  # 2.10 > 2.7: not as text
        assert torch_version_problem(ok) is None, ok
    assert torch_version_problem(torch.__version__) is None


def test_train_refuses_an_old_torch_at_start_up(monkeypatch):
    from megatron_wan import train

    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    with pytest.raises(SystemExit) as stop:
        train.main(["--config", "does-not-exist.yaml"])
    assert "needs torch >= 2.7" in str(stop.value) and "2.6.0+cu124" in str(stop.value)


# -- 7, 8. DeepSpeed: gradients reduced in fp32; a non-finite step skipped by DeepSpeed's own check -----------------

def _deepspeed_poisoned_step(tmp):
    """The generated config (ZeRO-3, parameters and optimizer offloaded, bf16) on 2 ranks: three steps, the second
    with an infinite gradient on rank 1 only. (the reduction dtype DeepSpeed's optimizer uses, stepped flags,
    DeepSpeed's count of steps it skipped, weights unchanged by the poisoned step, the next step trained)."""
    from test_hardening import _TwoBlocks, poisoned_steps

    from megatron_wan import parallel
    from megatron_wan.config import load_config
    from megatron_wan.engines import build_engine

    parallel.initialize()
    cfg = load_config(None, ["run.engine=deepspeed", "run.dtype=bf16", "optim.lr=0.1", "run.finetune=full",
                             "lora=null", "objective.reference=copy"])
    torch.manual_seed(0)
    engine = build_engine(cfg, _TwoBlocks())
    stepped, weights = poisoned_steps(engine, bf16=True)
    return (str(engine.optimizer.communication_data_type), stepped, engine.model.skipped_steps,
            torch.equal(weights[0], weights[1]), not torch.equal(weights[1], weights[2]))


@pytest.fixture(scope="module")
def deepspeed_poisoned(tmp_path_factory):
    return run_local(_deepspeed_poisoned_step, 2, str(tmp_path_factory.mktemp("ds")),
                     env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


def test_deepspeed_reduces_gradients_in_fp32(deepspeed_poisoned):
    from deepspeed.runtime.config import get_communication_data_type

    from megatron_wan.config import load_config
    from megatron_wan.engines.deepspeed import deepspeed_config

    generated = deepspeed_config(load_config(None, ["run.engine=deepspeed", "run.dtype=bf16"]))
    assert get_communication_data_type(generated) == torch.float32  # as DeepSpeed reads the config
    assert all(comm == "torch.float32" for comm, *_ in deepspeed_poisoned)  # what its ZeRO-3 optimizer uses


def test_deepspeed_skips_a_non_finite_step_itself_under_zero3(deepspeed_poisoned):
    for _, stepped, skipped_by_deepspeed, unchanged, moved_on in deepspeed_poisoned:
        assert stepped == [True, False, True] and unchanged and moved_on
        assert skipped_by_deepspeed == 1  # its own check skipped it: the engine read no gradient partition


def test_which_deepspeed_setups_check_gradients_themselves():
    from megatron_wan.engines.deepspeed import deepspeed_checks_gradients

    zero3 = {"zero_optimization": {"stage": 3}}
    assert deepspeed_checks_gradients(zero3, "0.19.8") and deepspeed_checks_gradients(zero3, "0.20.1+cu128")
    assert not deepspeed_checks_gradients(zero3, "0.19.5")  # its ZeRO-3 step checks only fp16 loss scaling
    assert not deepspeed_checks_gradients({"zero_optimization": {"stage": 2}}, "0.19.8")
    assert not deepspeed_checks_gradients({}, "0.19.8")


# -- 10. ring attention on CUDA: torch's flash kernel where kernel_for_call allows a flash kernel ------------------

def test_ring_attention_kernel_follows_the_flash_rule():
    assert cp.ring_kernel(BF16, "cuda", 128) == "flash"  # Wan's head dim, bf16 under autocast: the recipes' case
    assert cp.ring_kernel(torch.float16, "cuda", 64) == "flash"
    assert cp.ring_kernel(FP32, "cuda", 128) == "efficient"  # the flash kernel takes fp16/bf16 only
    assert cp.ring_kernel(BF16, "cuda", 320) == "efficient"  # head dims above 256
    assert cp.ring_kernel(BF16, "cuda", 100) == "efficient"  # nor ones that are not a multiple of 8
    assert cp.ring_kernel(BF16, "cpu", 128) == "cpu"
    for dtype, head_dim in ((BF16, 128), (FP32, 128), (BF16, 320), (BF16, 100)):  # one rule for both
        flash = cp.kernel_for_call("flash", dtype, "cuda", head_dim) == "flash"
        assert (cp.ring_kernel(dtype, "cuda", head_dim) == "flash") == flash


# -- compile: the 40 blocks of a 14B model share one compiled graph -----------------------------------------------

def _graphs_of_a_deep_model(layers):
    """Dynamo's graphs and recompiles for one no-grad forward of a `layers`-block tiny model compiled block by block
    (a fresh process: the counters and caches are this one's)."""
    from megatron_wan import parallel
    from megatron_wan.compile import compile_blocks, compile_stats
    from megatron_wan.model import WanModel

    parallel.initialize()
    cfg = preset("tiny", num_layers=layers)
    torch.manual_seed(0)
    model = compile_blocks(WanModel(cfg), "default")
    x, t, text, _ = inputs(cfg, (2, 2, 2))
    with torch.no_grad():
        model(x, t, text)
    stats = compile_stats()
    return stats["graphs"], stats["recompiles"]


def test_forty_blocks_share_one_compiled_graph():
    """Wan 2.1/2.2-14B has 40 blocks; dynamo's recompile limit is 8 per code object. The blocks' forward is one code
    object whose parameters are graph inputs, so depth adds no graph."""
    graphs, recompiles = run_local(_graphs_of_a_deep_model, 1, 40, env={"OMP_NUM_THREADS": "1"})[0]
    assert (graphs, recompiles) == (1, 0)
