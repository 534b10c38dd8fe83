"""The parameter description's FLOP counts (default and custom lora.targets) against torch's FlopCounterMode and
its parameter counts against the model, the planner's activation model against the bytes autograd saves
(SavedTensorMeter), and the planner's answer to the paper's case (Appendix A.2)."""

import dataclasses
import json
import math

import pytest
import torch
from pair_fixtures import pair_batch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_wan import parallel
from megatron_wan.bench import activation_memory, plan
from megatron_wan.bench.meters import SavedTensorMeter
from megatron_wan.config import ConfigError
from megatron_wan.model import PRESETS, WanModel, preset
from megatron_wan.models import get_model_spec
from megatron_wan.models.wan21.adapter import config_to_diffusers
from megatron_wan.models.wan21.lora import DEFAULT_TARGETS, apply_lora
from megatron_wan.objectives.flow_matching import FlowMatching
from megatron_wan.objectives.pair_step import PairObjective
from megatron_wan.objectives.reference import make_reference
from megatron_wan.throughput import step_flops

TEXT_LEN = 7  # pair_batch's prompt length
ACTIVATION_TOLERANCE = 0.01  # measured: within 0.4% (left out: parameter-shaped copies, e.g. of norm weights)


# custom lora.targets: a subset of the defaults, cross-attention keys/values on the text tokens, and I2V's image
# keys/values (on the CLIP tokens), which the defaults leave out
TARGETS = {"tiny": ("linear_q", "linear_fc2"), "tiny-i2v": ("linear_k", "linear_v", "linear_k_img", "linear_v_img")}


def _model(name, lora_rank=0, targets=DEFAULT_TARGETS, **overrides):
    parallel.initialize()
    torch.manual_seed(0)
    cfg = preset(name, **overrides)
    model = WanModel(cfg)
    return cfg, apply_lora(model, lora_rank, 2 * lora_rank, targets) if lora_rank else model


def _described(cfg):
    return get_model_spec("wan2.1").parameters(cfg)


def _counted(fn) -> int:
    """FLOPs FlopCounterMode counts in fn(); sdpa's math path, so attention is counted as its matmuls."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,lora_rank,custom", [("tiny", 0, False), ("tiny-i2v", 0, False), ("tiny", 4, False),
                                                    ("tiny-i2v", 4, False), ("tiny", 4, True), ("tiny-i2v", 4, True)])
def test_forward_flops_equal_flop_counter(name, lora_rank, custom):
    targets = TARGETS[name] if custom else None  # None: the family's defaults
    cfg, model = _model(name, lora_rank, targets or DEFAULT_TARGETS)
    grid = (3, 10, 14)
    batch = pair_batch(cfg, n=2, grid=grid)
    c = batch.conditions
    x = batch.win if c.cond is None else torch.cat([batch.win, c.cond], dim=1)
    with torch.no_grad():
        counted = _counted(lambda: model(x, torch.tensor([500.0, 300.0]), c.text, c.clip))
    assert counted == _described(cfg).forward_flops(grid, TEXT_LEN, 2, lora_rank, targets)["total"]


@pytest.mark.parametrize("name,pair_mode", [("tiny", "batched"), ("tiny-i2v", "sequential")])
def test_step_flops_are_three_forwards_less_the_unneeded_input_gradients(name, pair_mode):
    """A Reg-DPO step with full fine-tuning. FlopCounterMode counts real backward products; the model-FLOPs
    convention (backward = 2 forwards) also counts input gradients of the layers fed by plain data,
    which autograd skips: the patch embed, and the first linears of the time and text MLPs."""
    cfg, model = _model(name)
    grid, pairs = (3, 10, 14), 2
    reference = make_reference("copy", model)
    objective = PairObjective(FlowMatching(), pair_mode=pair_mode)
    counted = _counted(lambda: objective.step(model, reference, pair_batch(cfg, n=pairs, grid=grid), step=0))
    s, d = _described(cfg).video_tokens(grid), cfg.dim
    skipped = 2 * pairs * 2 * (s * cfg.in_dim * math.prod(cfg.patch_size) * d + cfg.freq_dim * d
                               + TEXT_LEN * cfg.text_dim * d)
    assert counted == step_flops(_described(cfg), grid, TEXT_LEN, pairs, "regdpo", pair_mode)["total"] - skipped


def test_step_flops_parts():
    cfg = preset("wan2.1-i2v-14b-720p")
    grid = (21, 90, 160)
    described = _described(cfg)
    fwd = described.forward_flops(grid, 512)["total"]
    sft = step_flops(described, grid, 512, objective="sft")
    dpo = step_flops(described, grid, 512, objective="regdpo", recompute=True)
    assert sft["total"] == 3 * fwd
    assert dpo["reference_forward"] == 2 * fwd and dpo["policy_forward"] == 2 * fwd
    assert fwd > dpo["recompute"] / 2 > 0.95 * fwd  # the blocks are nearly all of a forward


@pytest.mark.parametrize("name,custom", [("tiny", False), ("tiny-i2v", False), ("tiny", True), ("tiny-i2v", True)])
def test_parameter_count_matches_the_model(name, custom):
    targets = TARGETS[name] if custom else None
    cfg, model = _model(name)
    count = _described(cfg).count(lora_rank=4, targets=targets)
    assert count["total"] == sum(p.numel() for p in model.parameters())
    blocks = [p.numel() for n, p in model.named_parameters() if n.startswith("blocks.0.")]
    assert count["block"] == sum(blocks) and count["other"] == count["total"] - cfg.num_layers * count["block"]
    apply_lora(model, 4, 8, targets or DEFAULT_TARGETS)
    assert count["lora"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_description_counts_equal_diffusers_on_meta(name):
    """The description's counts of every preset against diffusers' WanTransformer3DModel: whole, one block, the
    rest (tests/test_convert.py checks the parameter table's names and shapes against it)."""
    from diffusers import WanTransformer3DModel

    cfg = preset(name)
    with torch.device("meta"):
        ref = WanTransformer3DModel(**config_to_diffusers(cfg))
    count = _described(cfg).count()
    block = sum(p.numel() for p in ref.blocks[0].parameters())
    assert count["total"] == sum(p.numel() for p in ref.parameters())
    assert (count["block"], count["other"]) == (block, count["total"] - cfg.num_layers * block)


def test_lora_targets_matching_nothing_are_refused_like_apply_lora():
    cfg, model = _model("tiny")
    with pytest.raises(ValueError, match="match no parallel linear"):
        apply_lora(model, 4, 8, ("linear_1",))  # the text embedding's: a whole nn.Linear, not a parallel one
    with pytest.raises(ValueError, match="match no parallel linear"):
        _described(cfg).forward_flops((1, 2, 2), TEXT_LEN, lora_rank=4, targets=("linear_1",))


CASES = [  # name, lora rank, precision, recompute, latent grid, pairs, layers
    ("tiny", 0, "fp32", False, (3, 10, 14), 1, 2),
    ("tiny", 0, "bf16", False, (4, 16, 16), 2, 2),
    ("tiny-i2v", 0, "bf16", False, (2, 12, 20), 1, 1),
    ("tiny", 0, "bf16", True, (4, 16, 16), 1, 3),
    ("tiny-i2v", 0, "bf16", True, (2, 12, 20), 2, 2),
    ("tiny", 4, "autocast", False, (4, 12, 16), 1, 2),
    ("tiny-i2v", 4, "autocast", False, (2, 12, 20), 1, 3),
    ("tiny", 4, "autocast", True, (4, 12, 16), 1, 3),
    ("tiny-i2v", 4, "autocast", True, (2, 12, 20), 2, 2),
    ("tiny-i2v", 8, "fp32", False, (3, 10, 14), 1, 2),
    ("tiny-i2v", 8, "fp32", True, (3, 10, 14), 1, 2),
]


@pytest.mark.parametrize("name,lora_rank,precision,recompute,grid,pairs,layers", CASES)
def test_activation_model_matches_saved_bytes(name, lora_rank, precision, recompute, grid, pairs, layers):
    """Peak bytes saved for backward by a batched Reg-DPO step (policy on 2 x pairs samples, reference
    without a graph) against the planner. `autocast` is LoRA as megatron_wan.train runs it: frozen base
    in bf16, fp32 adapters, bf16 autocast; the meter also sees the autocast's bf16 copies of the adapters.
    With recompute the meter sees what the checkpoints keep but neither RoPE (held by the recompute
    closure) nor the recomputed block (saved through the checkpoint's own hooks): the planner still
    counts both as memory, so they are taken out here."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    cfg, model = _model(name, lora_rank, num_layers=layers, recompute=recompute,
                        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    if precision == "autocast":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    reference = make_reference("adapter" if lora_rank else "copy", model)
    batch = pair_batch(cfg, n=pairs, grid=grid)
    with SavedTensorMeter(exclude=list(model.parameters())) as meter, torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        PairObjective(FlowMatching()).step(model, reference, batch, step=0)
    predicted = plan.activation_bytes(cfg, grid, TEXT_LEN, samples=2 * pairs, dtype_bytes=dtype.itemsize,
                                      recompute=recompute, lora_rank=lora_rank)
    seen = predicted["total"] - (predicted["rope"] + predicted["recompute"] if recompute else 0)
    if precision == "autocast" and not recompute:
        seen += _described(cfg).count(lora_rank)["lora"] * 2
    assert seen == pytest.approx(meter.peak, rel=ACTIVATION_TOLERANCE)


def test_activation_model_under_context_parallel():
    """CP=2 over two processes (ring attention): the largest rank's saved bytes against its local grid."""
    grid, text_len = (5, 16, 24), 16  # 5 token frames over 2 ranks: 3 each, the second with one padded
    summary = activation_memory.main(["--grid", *map(str, grid), "--text-len", str(text_len), "--cp", "2",
                                      "--repeats", "0"])
    local = (math.ceil(grid[0] / 2), *grid[1:])
    predicted = plan.activation_bytes(preset("tiny"), local, text_len, cp=2, dtype_bytes=4)["total"]
    assert predicted == pytest.approx(summary["saved_bytes_cp2"], rel=ACTIVATION_TOLERANCE)


def test_planner_answers_the_paper_case(capsys):
    rows = plan.main(["--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(rows))
    setup = plan.Setup()  # the defaults are the paper's case
    assert (setup.preset, setup.height, setup.width, setup.frames, setup.gpus, setup.cp, setup.gpu) == (
        "wan2.1-i2v-14b-720p", 720, 1280, 200, 8, 4, "h100")
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == ["megatron tp1 cp4", "deepspeed tp1 cp4", "megatron tp1 cp4 dp_shard 8", "fsdp tp1 cp1",
                             "fsdp alone"]
    for row in rows:
        memory, s = row["memory"], plan.Setup(**row["setup"])
        assert memory["total"] == sum(v for k, v in memory.items() if k not in ("total", "fits"))
        assert memory["fits"] == (memory["total"] <= plan.GPUS[s.gpu].memory)
        longest = row["longest_frames"]
        assert (longest >= setup.frames) == memory["fits"]
        if longest:  # the longest fits and four frames more (one latent frame) do not
            assert plan.memory(dataclasses.replace(s, frames=longest))["fits"]
        assert not plan.memory(dataclasses.replace(s, frames=longest + 4))["fits"]
        group = s.tp * s.cp * (2 if s.pair_mode == "ranks" else 1)
        assert row["step_s"] == pytest.approx(row["step_flops"] / (group * plan.GPUS[s.gpu].peak_flops * s.mfu))
    ours, fsdp = by_name["megatron tp1 cp4"], by_name["fsdp tp1 cp1"]
    assert ours["setup"]["pair_mode"] == fsdp["setup"]["pair_mode"]
    assert ours["longest_frames"] > 2 * fsdp["longest_frames"] > 2 * by_name["fsdp alone"]["longest_frames"]
    for row in rows:
        assert row["capacity_vs_fsdp"] == row["longest_frames"] / fsdp["longest_frames"]
    assert ours["memory"]["activations"] < fsdp["memory"]["activations"] / 3  # the video split over 4 ranks
    # the same work per pair on the same 8 GPUs: the same seconds per pair (compute only)
    assert ours["step_s"] / ours["pairs_per_step"] == pytest.approx(fsdp["step_s"] / fsdp["pairs_per_step"])
    # what the trainer rejects, the planner rejects: A.2's winner/loser ranks need CP=1 in megatron_wan.train
    with pytest.raises(ValueError, match="pair_mode"):
        plan.Setup(pair_mode="ranks")


def test_planner_memory_grows_with_frames_and_falls_with_cp():
    base = plan.Setup(frames=81)
    totals = [plan.memory(dataclasses.replace(base, frames=f))["total"] for f in (21, 81, 161)]
    assert totals == sorted(totals) and len(set(totals)) == 3
    acts = [plan.memory(dataclasses.replace(base, cp=cp))["activations"] for cp in (1, 2, 4, 8)]
    assert acts == sorted(acts, reverse=True)
    with pytest.raises(ValueError, match="engine: expected one of"):
        plan.Setup(engine="fsdp")  # the FSDP baselines are our engine with dp_shard
    with pytest.raises(ConfigError, match="run.dp_shard: 3 does not divide"):
        plan.Setup(dp_shard=3)
    with pytest.raises(ValueError, match="adapter"):
        plan.Setup(finetune="full", reference="adapter")

