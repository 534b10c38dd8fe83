"""Reg-DPO on Wan 2.2 A14B's experts (model.expert): every draw on the trained expert's side of the boundary (checked
on the draws themselves and on the timesteps each training step logs), truncated draws distributed as the full draw
conditioned on the side, `both` routing each pair by its t, and exact resume of a `both` run.

The runs train a tiny random T2V-A14B folder (transformer + transformer_2 + boundary_ratio 0.875, written by
`save_pretrained`) on the GT-Pairs of the real clips encoded with its own encoders.
"""

import json
from pathlib import Path

import pytest
import torch

from megatron_wan.config import ConfigError, load_config, resume_changes
from megatron_wan.objectives.experts import ExpertFlow, Experts, boundary_ratio, is_high_noise
from megatron_wan.objectives.flow_matching import FlowMatching
from megatron_wan.parallel.local import run_local

REPO = Path(__file__).parent.parent
RECIPE = REPO / "configs" / "tiny-wan2.2-t2v-a14b-regdpo.yaml"
LOSSES = ("loss", "model_err_w", "model_err_l", "ref_err_w", "ref_err_l", "grad_norm")


@pytest.fixture(scope="module")
def a14b(wan22_models, wan22_encoded):
    """(the tiny T2V-A14B folder, its encoded GT-Pairs)."""
    return wan22_models["t2v-a14b"], wan22_encoded


def _train(args):
    from megatron_wan.train import main

    return main(args)


def train(world, folder, data, out, *overrides):
    args = ["--config", str(RECIPE), f"model.weights={folder}", f"data.dir={data}", f"run.output_dir={out}",
            *overrides]
    return run_local(_train, world, args, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})[0]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
@pytest.mark.parametrize("expert", ["high_noise", "low_noise", "both"])
def test_every_draw_is_on_the_experts_side(expert, sampling):
    flow = ExpertFlow(shift=3.0, timestep_sampling=sampling, seed=7, expert=expert, boundary_ratio=0.875)
    for step in range(60):
        sigma, _ = flow.draw(step, range(8), (1, 1, 1, 1))
        high = is_high_noise(flow.model_timestep(sigma), 0.875)
        side = flow.step_expert(step)
        assert expert == "both" or side == expert
        assert high.all() if side == "high_noise" else not high.any(), (step, sigma)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf = [torch.searchsorted(x.sort().values, grid, right=True) / len(x) for x in (a, b)]
    return (cdf[0] - cdf[1]).abs().max().item()


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_truncated_draws_are_the_full_draw_conditioned_on_the_side(sampling):
    """Each expert's draws are distributed as the plain FlowMatching draws that fall on its side (two-sample KS
    distance under its 0.1% critical value), and `both` sends a step to the high-noise side as often as the full
    draw lands there."""
    n = 8000
    full = FlowMatching(shift=3.0, timestep_sampling=sampling, seed=1).draw(0, range(n), ())[0]
    for expert, keep in (("high_noise", full >= 0.875), ("low_noise", full < 0.875)):
        flow = ExpertFlow(shift=3.0, timestep_sampling=sampling, seed=2, expert=expert, boundary_ratio=0.875)
        mine, theirs = flow.draw(0, range(n), ())[0], full[keep]
        critical = 1.95 * (1 / len(mine) + 1 / len(theirs)) ** 0.5
        assert _ks(mine, theirs) < critical, expert
        assert _ks(mine, full[~keep]) > 0.9  # (the test can tell the sides apart)
    both = ExpertFlow(shift=3.0, timestep_sampling=sampling, seed=3, expert="both", boundary_ratio=0.875)
    share = sum(both.step_expert(s) == "high_noise" for s in range(4000)) / 4000
    assert share == pytest.approx((full >= 0.875).float().mean().item(), abs=0.03)
    assert share == pytest.approx(both.high_noise_share(), abs=0.03)


def test_experts_route_each_sample_by_its_timestep(wan22_models):
    """A batch mixing both sides: each sample's output is its own expert's (the two differ)."""
    from megatron_wan.models import wan22

    folder = wan22_models["t2v-a14b"]
    high = wan22.adapter.load(wan22.WanModel, folder, expert="high_noise")
    low = wan22.adapter.load(wan22.WanModel, folder, expert="low_noise")
    ratio = boundary_ratio(load_config(RECIPE, [f"model.weights={folder}"]).model)
    assert ratio == 0.875  # from the folder's model_index.json
    routed = Experts(high, low, ratio)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(3, 16, 2, 4, 4, generator=g), torch.randn(3, 8, 32, generator=g)
    t = torch.tensor([990.0, 100.0, 875.0])  # 875 = the boundary: high noise, as WanPipeline
    with torch.no_grad():
        out = routed(x, t, text)
        for i, expert in ((0, high), (1, low), (2, high)):
            alone = expert(x[i:i + 1], t[i:i + 1], text[i:i + 1])
            other = (low if expert is high else high)(x[i:i + 1], t[i:i + 1], text[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(alone, other)


@pytest.mark.parametrize("overrides, message", [
    (["model.expert=middle"], "model.expert: expected one of"),
    (["model.expert=both", "model.boundary_ratio=1.5"], r"model.boundary_ratio: expected a number in \(0, 1\)"),
    (["model.expert=both", "objective.reference=copy_offload"], "objective.reference: copy_offload streams one"),
    (["model.expert=high_noise", "run.sample_every=5"], "run.sample_every: samples during training are not"),
])
def test_expert_config_errors_name_the_key(overrides, message, wan22_models):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, [f"model.weights={wan22_models['t2v-a14b']}", *overrides])


def test_an_expert_needs_two_experts(models):
    with pytest.raises(ConfigError, match="model.expert: high_noise needs two experts and their boundary"):
        load_config(RECIPE, [f"model.weights={models['t2v']}", "model.expert=high_noise"])  # a Wan 2.1 folder


def test_resume_refuses_another_expert(wan22_models):
    a = load_config(RECIPE, [f"model.weights={wan22_models['t2v-a14b']}", "model.expert=high_noise"])
    b = load_config(RECIPE, [f"model.weights={wan22_models['t2v-a14b']}", "model.expert=both"])
    refused, _ = resume_changes(a.to_dict(), b)
    assert refused == ["model.expert: 'high_noise' -> 'both'"]


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_one_expert_trains_on_its_side(expert, a14b, tmp_path):
    folder, data = a14b
    summary = train(1, folder, data, tmp_path, f"model.expert={expert}", "run.steps=4", "run.context_parallel=1")
    assert summary["steps"] == 4
    rows = metrics(tmp_path)
    for row in rows:  # the step's smallest and largest drawn timestep, over every rank
        if expert == "high_noise":
            assert row["timestep_min"] >= 875, row
        else:
            assert row["timestep_max"] < 875, row
    assert all(r["skipped"] == 0 and r["loss"] == r["loss"] for r in rows)
    from megatron_wan.export import read_engine_weights

    (saved,) = read_engine_weights(tmp_path / "checkpoints" / "step_000004" / "engine", 1)
    assert saved and all(".lora_" in k for k in saved)  # the expert's adapters


def test_both_experts_route_by_t_and_resume_exactly(a14b, tmp_path):
    """Reg-DPO of `both` on 2 ranks (CP=2): each step's draws on one side, both experts trained over the run;
    3 steps, then a re-launch to 8, logs per-step losses bit-equal to 8 steps straight."""
    folder, data = a14b
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(2, folder, data, straight, "model.expert=both", "run.steps=8")["steps"] == 8
    rows = metrics(straight)
    sides = []
    for row in rows:
        high = row["timestep_min"] >= 875
        assert high == (row["timestep_max"] >= 875), row  # winner and loser, and every pair of the step: one side
        sides.append(high)
    assert True in sides and False in sides  # both experts trained (seed 42: high-noise share ~0.3)
    from megatron_wan.export import read_engine_weights

    (saved,) = read_engine_weights(straight / "checkpoints" / "step_000008" / "engine", 1)
    assert {k.split(".")[0] for k in saved} == {"high_noise", "low_noise"}
    assert train(2, folder, data, split, "model.expert=both", "run.steps=3")["steps"] == 3
    resumed = train(2, folder, data, split, "model.expert=both", "run.steps=8")
    assert resumed["resumed_from"].endswith("step_000003") and resumed["steps"] == 8
    again = metrics(split)
    assert [r["step"] for r in again] == list(range(1, 9))
    for k in (*LOSSES, "timestep_min", "timestep_max"):
        assert [r[k] for r in again] == [r[k] for r in rows], k  # bit for bit


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("wan2.2-*.yaml")), ids=lambda p: p.stem)
def test_wan22_recipes_are_appendix_a7(recipe):
    """The Wan 2.1 recipes' A.7 settings; A14B recipes train one expert each, on the preset's boundary."""
    from megatron_wan.config import validate

    cfg = load_config(recipe)
    validate(cfg, 8)
    assert (cfg.run.context_parallel, cfg.run.batch_size, cfg.optim.lr, cfg.run.save_every) == (4, 1, 5e-6, 300)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.objective.beta, cfg.objective.sft_weight) == (16, 32, 500, "dgr")
    expert = next((e for e in ("high_noise", "low_noise") if e.replace("_", "-") in recipe.stem), None)
    assert cfg.model.expert == expert and cfg.model.preset in recipe.stem
    assert boundary_ratio(cfg.model) == {"t2v-a14b": 0.875, "i2v-a14b": 0.9, "ti2v-5b": None}[
        cfg.model.preset.removeprefix("wan2.2-")]
    assert cfg.run.task == ("i2v" if "-i2v-" in recipe.stem else "t2v")
