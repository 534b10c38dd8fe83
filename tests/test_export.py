"""Export round trip: tiny Reg-DPO LoRA runs (TP=1 on one rank, TP=2 on two) exported to every format and loaded by
diffusers (WanPipeline.load_lora_weights for the diffusers and ComfyUI files, peft for its folder, from_pretrained
for the merged transformer) give the outputs of the model the trainer holds, to 1e-5 relative. A full fine-tune
checkpoint split over TP=2 exports bit-exactly; a DeepSpeed ZeRO-3 checkpoint gives the adapters its engine trained;
errors name the file or the option."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from diffusers import WanPipeline, WanTransformer3DModel
from peft import PeftModel
from safetensors import safe_open
from test_train import argv
from wan_reference import inputs, perturbed_reference, rel_err

from megatron_wan.engines.megatron import ENGINE_DIR, tp_key
from megatron_wan.export import ADAPTER_FORMATS, FORMATS, export, main, read_checkpoint
from megatron_wan.model import preset
from megatron_wan.models.wan21.adapter import param_table, rename, split_tp, to_ours
from megatron_wan.parallel.local import run_local

BATCH = inputs(preset("tiny"), grid=(2, 4, 4), timesteps=(3.0, 500.0))


def _trained_model(args):
    from megatron_wan.train import Trainer, load_config

    trainer = Trainer(load_config(args[1], args[2:]))
    trainer.run()
    return trainer.engine.module.eval()


def _train_and_predict(args, batch):
    """Train, then the trained model's prediction on `batch`, with its adapters and without."""
    from megatron_wan.models.wan21.lora import disable_adapter

    model = _trained_model(args)
    x, t, text, _ = batch
    with torch.no_grad():
        trained = model(x, t, text)
        with disable_adapter(model):
            base = model(x, t, text)
    return trained, base


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def run(request, models, encoded, tmp_path_factory):
    tp = request.param
    out = tmp_path_factory.mktemp(f"export-tp{tp}")
    args = argv("t2v", models, encoded, out / "run", "run.steps=3", "run.context_parallel=1",
                f"run.tensor_parallel={tp}")
    trained, base = run_local(_train_and_predict, tp, args, BATCH, env={"OMP_NUM_THREADS": "1"})[0]
    written = export(out / "run", out / "export", formats=FORMATS, max_shard_size="200KB")
    return SimpleNamespace(out=out, base_model=models["t2v"], written=written, trained=trained, base=base)


def predict(transformer) -> torch.Tensor:
    x, t, text, _ = BATCH
    with torch.no_grad():
        return transformer(x, t, text, return_dict=False)[0]


@pytest.mark.parametrize("fmt, weight_name", [("diffusers", None), ("comfyui", "lora.safetensors")])
def test_diffusers_lora_loader_gives_our_outputs(run, fmt, weight_name):
    pipe = WanPipeline.from_pretrained(run.base_model)
    pipe.load_lora_weights(run.written[fmt], weight_name=weight_name)
    assert rel_err(predict(pipe.transformer), run.trained) < 1e-5
    assert rel_err(run.base, run.trained) > 1e-3  # the adapters matter


def test_peft_folder_gives_our_outputs(run):
    transformer = WanTransformer3DModel.from_pretrained(run.base_model, subfolder="transformer")
    assert rel_err(predict(PeftModel.from_pretrained(transformer, run.written["peft"])), run.trained) < 1e-5


def test_merged_transformer_gives_our_outputs(run):
    folder = run.written["transformer"]
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    assert rel_err(predict(WanTransformer3DModel.from_pretrained(folder)), run.trained) < 1e-5


def test_comfyui_keys_name_original_wan_modules(run):
    """ComfyUI maps `diffusion_model.X.lora_up.weight` / `.lora_down.weight` / `.alpha` onto its weight X.weight,
    where X is the original Wan name; alpha / rank scales B @ A."""
    with safe_open(run.written["comfyui"] / "lora.safetensors", "pt") as f:
        keys = set(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    original = {rename(p.name, "original") for p in param_table(preset("tiny"))}
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 1)[0].removesuffix(".lora_up").removesuffix(".lora_down")
               for k in keys}
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert modules and {f"{m}.weight" for m in modules} <= original
    assert len(keys) == 3 * len(modules) and alphas == {8.0}


def test_cli_refuses_to_overwrite(run, capsys):
    out = run.out / "cli"
    main([str(run.out / "run" / "checkpoints"), "--out", str(out), "--formats", "comfyui", "--dtype", "bf16"])
    assert f"-> comfyui {out / 'comfyui'}" in capsys.readouterr().out
    with safe_open(out / "comfyui" / "lora.safetensors", "pt") as f:
        assert f.get_slice(next(k for k in f.keys() if "lora_up" in k)).get_dtype() == "BF16"
    with pytest.raises(SystemExit, match="exist; remove them or pass overwrite=True"):
        main([str(run.out / "run"), "--out", str(out), "--formats", "comfyui"])


def _fake_checkpoint(step_dir: Path, shards: list[dict], base, finetune="full") -> Path:
    """A checkpoint as MegatronEngine.save and the trainer write it."""
    step_dir.mkdir(parents=True)
    state = {tp_key(r): {"model": weights} for r, weights in enumerate(shards)}
    dcp.save(state, checkpoint_id=step_dir / ENGINE_DIR, no_dist=True)
    config = {"run": {"finetune": finetune, "engine": "megatron", "tensor_parallel": len(shards)},
              "model": {"weights": str(base), "layout": "diffusers", "preset": "tiny"}, "lora": None}
    (step_dir / "trainer.json").write_text(json.dumps({"step": 7, "config": config}))
    return step_dir


def test_full_finetune_tp2_exports_bit_exactly(models, tmp_path):
    cfg = preset("tiny")
    reference = perturbed_reference(cfg)
    shards = split_tp(to_ours(reference.state_dict(), cfg, "diffusers"), cfg, 2)
    ckpt = _fake_checkpoint(tmp_path / "step_000007", shards, models["t2v"])
    written = export(ckpt, tmp_path / "export")
    assert list(written) == ["transformer"]
    loaded = WanTransformer3DModel.from_pretrained(written["transformer"]).state_dict()
    assert loaded.keys() == reference.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    with pytest.raises(ValueError, match=r"\['peft'\] need LoRA adapters; .* is a full fine-tune"):
        export(ckpt, tmp_path / "other", formats=["peft"])
    config = json.loads((ckpt / "trainer.json").read_text())
    config["config"]["run"]["tensor_parallel"] = 3
    (ckpt / "trainer.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"run.tensor_parallel=3 but no weights of TP rank 2 \(tp02.model"):
        export(ckpt, tmp_path / "other")


def test_moved_base_folder_is_named(run, tmp_path):
    ckpt = tmp_path / "step"
    shutil.copytree(run.out / "run" / "checkpoints" / "step_000003", ckpt)
    state = json.loads((ckpt / "trainer.json").read_text())
    state["config"]["model"]["weights"] = str(tmp_path / "moved")
    (ckpt / "trainer.json").write_text(json.dumps(state))
    with pytest.raises(FileNotFoundError, match="moved: the run's base model folder .* pass the base folder"):
        export(ckpt, tmp_path / "out")
    assert export(ckpt, tmp_path / "out", formats=["transformer"], base=run.base_model)["transformer"].is_dir()


def _train_deepspeed(args):
    """Train with the DeepSpeed engine; its adapters, gathered from their ZeRO-3 partitions."""
    import deepspeed

    params = {n: p for n, p in _trained_model(args).named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def test_deepspeed_checkpoint_exports_its_adapters(models, encoded, tmp_path):
    args = argv("t2v", models, encoded, tmp_path / "run", "run.engine=deepspeed", "run.steps=2",
                "run.context_parallel=1")
    trained = run_local(_train_deepspeed, 1, args, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})[0]
    got = read_checkpoint(tmp_path / "run").weights
    assert got.keys() == trained.keys() and all(torch.equal(got[k], v) for k, v in trained.items())
    assert all(v.abs().max() > 0 for k, v in got.items() if ".lora_B." in k)  # it trained
    assert tuple(export(tmp_path / "run", tmp_path / "export")) == ADAPTER_FORMATS
