"""`python -m megatron_wan.export` on runs of Wan 2.2 A14B's experts (model.expert): a `both` run's checkpoint,
split per expert, loads in diffusers as `WanPipeline.from_pretrained(BASE, transformer=..., transformer_2=...)` and
as the LoRA pair (`load_lora_weights(..., load_into_transformer_2=True)`), and predicts what our model with the
trained adapters predicts; a one-expert run writes only its own expert.

The runs are the tiny recipe's (configs/tiny-wan2.2-t2v-a14b-regdpo.yaml) on the tiny random T2V-A14B folder, one
rank, one or two steps.
"""

import json
from pathlib import Path

import pytest
import torch
from wan_reference import inputs, rel_err

from megatron_wan.config import load_config
from megatron_wan.export import main as export_main
from megatron_wan.models.wan21.lora import apply_lora
from megatron_wan.models.wan22 import DIFFUSERS_FOLDERS, EXPERTS, HIGH_NOISE, LOW_NOISE, SPEC, WanModel
from megatron_wan.objectives.experts import flow_for
from megatron_wan.objectives.flow_matching import FlowMatching
from megatron_wan.parallel.local import run_local

REPO = Path(__file__).parent.parent
RECIPE = REPO / "configs" / "tiny-wan2.2-t2v-a14b-regdpo.yaml"
BOUNDARY = 875  # the tiny folder's boundary_ratio 0.875 x 1000


def _train(args):
    from megatron_wan.train import main

    return main(args)


def train(folder, data, out, *overrides):
    args = ["--config", str(RECIPE), f"model.weights={folder}", f"data.dir={data}", f"run.output_dir={out}",
            "run.context_parallel=1", *overrides]
    return run_local(_train, 1, args, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})[0]


def _two_sided_seed(folder) -> int:
    """A run.seed whose `both` run of the recipe trains the high-noise expert in one of its first two steps and the
    low-noise one in the other (each step draws its side from (seed, step), the trainer's flow)."""
    for seed in range(100):
        cfg = load_config(RECIPE, [f"model.weights={folder}"])
        flow = flow_for(cfg, FlowMatching(cfg.objective.shift, cfg.objective.timestep_sampling, seed=seed))
        if {flow.step_expert(0), flow.step_expert(1)} == set(EXPERTS):
            return seed
    raise AssertionError("no seed below 100 draws both sides in two steps")


@pytest.fixture(scope="module")
def both_run(wan22_models, wan22_encoded, tmp_path_factory):
    """The output dir of a 2-step `both` run whose steps train one expert each."""
    out = tmp_path_factory.mktemp("both-run")
    summary = train(wan22_models["t2v-a14b"], wan22_encoded, out, "model.expert=both", "run.steps=2",
                    "run.save_every=2", f"run.seed={_two_sided_seed(wan22_models['t2v-a14b'])}")
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["timestep_min"] >= BOUNDARY for r in rows) == [False, True]  # each expert trained once
    return out


def _ours(folder, expert, trained: dict, lora: dict) -> WanModel:
    """Our model of `expert` from the base folder with the run's adapters (the checkpoint's `expert.*` weights)."""
    model = SPEC.adapter.load(WanModel, folder, "diffusers", {}, expert=expert)
    apply_lora(model, lora["rank"], lora["alpha"], tuple(lora["targets"]))
    mine = {k[len(expert) + 1:]: v for k, v in trained.items() if k.startswith(f"{expert}.")}
    result = model.load_state_dict(mine, strict=False)
    assert mine and not result.unexpected_keys and not [k for k in result.missing_keys if ".lora_" in k]
    return model.eval()


def test_both_run_exports_to_diffusers_with_transformer_2(both_run, wan22_models, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    from megatron_wan.export import read_engine_weights

    base, out = wan22_models["t2v-a14b"], tmp_path / "export"
    written = export_main([str(both_run), "--out", str(out), "--formats", "transformer,peft,diffusers,comfyui"])
    assert set(written) == set(EXPERTS)
    assert written[HIGH_NOISE]["transformer"] == out / "transformer"
    assert written[LOW_NOISE]["transformer"] == out / "transformer_2"
    for expert in EXPERTS:
        assert (out / "diffusers" / expert / "pytorch_lora_weights.safetensors").is_file()
        assert (out / "peft" / expert / "adapter_model.safetensors").is_file()
        assert (out / "comfyui" / expert / "lora.safetensors").is_file()

    merged = WanPipeline.from_pretrained(
        base, transformer=WanTransformer3DModel.from_pretrained(out / "transformer"),
        transformer_2=WanTransformer3DModel.from_pretrained(out / "transformer_2"))
    assert merged.config.boundary_ratio == BOUNDARY / 1000
    lora = WanPipeline.from_pretrained(base)
    lora.load_lora_weights(out / "diffusers" / HIGH_NOISE)
    lora.load_lora_weights(out / "diffusers" / LOW_NOISE, load_into_transformer_2=True)
    plain = WanPipeline.from_pretrained(base)

    step = both_run / "checkpoints" / "step_000002"
    (trained,) = read_engine_weights(step / "engine", 1)
    run = json.loads((step / "trainer.json").read_text())["config"]
    x, t, text, _ = inputs(SPEC.config("tiny-wan2.2-t2v-a14b"), (2, 2, 2), timesteps=(950.0, 300.0))
    with torch.no_grad():
        for expert, sub in DIFFUSERS_FOLDERS.items():
            want = _ours(base, expert, trained, run["lora"])(x, t, text)  # our model with the trained adapters
            for pipe in (merged, lora):
                got = getattr(pipe, sub)(x, t, text, return_dict=False)[0]
                assert rel_err(got, want) < 1e-5, (expert, pipe is merged)
            assert rel_err(getattr(plain, sub)(x, t, text, return_dict=False)[0], want) > 1e-4, expert  # trained


def test_one_expert_run_exports_only_its_expert(wan22_models, wan22_encoded, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    train(wan22_models["t2v-a14b"], wan22_encoded, run, f"model.expert={LOW_NOISE}", "run.steps=1",
          "run.save_every=1")
    written = export_main([str(run), "--out", str(tmp_path / "export")])
    assert list(written) == [LOW_NOISE] and set(written[LOW_NOISE]) == {"peft", "diffusers", "comfyui"}
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["comfyui", "diffusers", "peft"]
    assert [p.name for p in (tmp_path / "export" / "diffusers").iterdir()] == [LOW_NOISE]
    comfy = load_file(written[LOW_NOISE]["comfyui"] / "lora.safetensors")
    assert comfy and all(k.startswith("diffusion_model.blocks.") for k in comfy)


def test_reading_an_expert_run_as_one_model_names_the_way(both_run):
    from megatron_wan.export import read_checkpoint

    with pytest.raises(ValueError, match=r"a run of the Wan 2.2 experts \['high_noise', 'low_noise'\].*read_experts"):
        read_checkpoint(both_run)
