"""Hardening of training and settings: out-of-range settings and resumes under changed settings refused with one
line naming the key, per-sample CRC32 checks as shards are read, checkpoints sealed by a manifest of per-file
SHA-256 (with fallback to the previous one that passes), non-finite gradients really skipped by both engines,
complete input gradients of the context-parallel public forward, and quiet library imports."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_wan.config import ConfigError, load_config
from megatron_wan.parallel.local import run_local

REPO = Path(__file__).parent.parent
RECIPE = REPO / "configs" / "tiny-t2v-regdpo.yaml"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# -- 14: every key's range ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("objective.beta=0", "objective.beta: expected > 0, found 0"),
    ("objective.beta=-500", "objective.beta: expected > 0, found -500"),
    ("objective.shift=0", "objective.shift: expected > 0, found 0"),
    ("objective.shift=-3", "objective.shift: expected > 0, found -3"),
    ("lora.rank=0", "lora.rank: expected >= 1, found 0"),
    ("lora.alpha=0", "lora.alpha: expected > 0, found 0"),
    ("lora.targets=[]", "lora.targets: expected a non-empty list"),
    ("optim.lr=0", "optim.lr: expected > 0, found 0"),
    ("optim.lr=.nan", "optim.lr: expected > 0, found nan"),
    ("optim.eps=-1e-8", "optim.eps: expected > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: expected >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip: expected >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: expected >= 0"),
    ("optim.min_lr=1.0", "optim.min_lr: expected <= optim.lr"),
    ("optim.betas=[0.9, 1.0]", "optim.betas: expected two numbers in [0, 1)"),
    ("run.seed=-1", "run.seed: expected >= 0"),
    ("model.init_seed=-1", "model.init_seed: expected >= 0"),
    ("run.collapse_gap=-1", "run.collapse_gap: expected >= 0"),
    ("run.collapse_steps=0", "run.collapse_steps: expected >= 1"),
    ("data.num_workers=-1", "data.num_workers: expected >= 0"),
    ("data.text_len=0", "data.text_len: expected >= 1"),
    ("data.on_corrupt=ignore", "data.on_corrupt: expected one of ['abort', 'skip']"),
    ("run.output_dir=''", "run.output_dir: expected a directory"),
])
def test_out_of_range_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(RECIPE, [override])


@pytest.mark.parametrize("overrides, env, key", [
    (["objective.beta=-1"], {}, "objective.beta"),
    (["lora.rank=0"], {}, "lora.rank"),
    (["run.tensor_parallel=2"], {"WORLD_SIZE": "2", "RANK": "0"}, "run.tensor_parallel x run.context_parallel"),
    (["run.tensor_parallel=2"], {"WORLD_SIZE": "2", "RANK": "1"}, None),  # other ranks: silent, same exit
])
def test_bad_settings_exit_with_one_line(overrides, env, key, monkeypatch, capsys, tmp_path):
    """What `python -m megatron_wan.train` does with them: a ConfigError line (rank 0), exit status 2, raised
    before any process group or model exists."""
    from megatron_wan import parallel
    from megatron_wan.train import main

    def no_process_groups(*args, **kwargs):  # this pytest process may already hold groups of an earlier test
        raise AssertionError("process groups were set up before the settings were checked")

    monkeypatch.setattr(parallel, "initialize", no_process_groups)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(RECIPE), f"run.output_dir={tmp_path}", *overrides])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    if key is None:
        assert err == []
    else:
        assert len(err) == 1 and err[0].startswith(f"megatron_wan.train: {key}"), err


# -- 16: shards checked as they are read --------------------------------------------------------------------

def _dataset(directory: Path, pairs: int = 3) -> dict:
    """A hand-made encoded dataset (one shard, `pairs` T2V pairs of one latent shape); {sample key: latent}."""
    from megatron_wan.data.shards import ShardWriter

    g = torch.Generator().manual_seed(0)
    latents = {}
    directory.mkdir()
    with ShardWriter(directory / "shard-00000") as w:
        for i in range(pairs):
            for side in ("w", "l"):
                latents[f"{side}{i}"] = torch.randn(16, 1, 2, 2, generator=g)
                w.add(f"{side}{i}", {"latent": latents[f"{side}{i}"], "text_emb": torch.randn(3, 8, generator=g)})
    (directory / "manifest.json").write_text(json.dumps({"encoder": {"task": "t2v"},
                                                         "shards": [{"prefix": "shard-00000"}]}))
    (directory / "train.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "winner": {"id": f"w{i}"}, "loser": {"id": f"l{i}"}}) + "\n" for i in range(pairs)))
    return latents


def _flip_a_bit(path: Path, inside: torch.Tensor) -> None:
    """Flip one bit of `path` inside the stored bytes of tensor `inside`."""
    data = bytearray(path.read_bytes())
    at = data.find(inside.numpy().tobytes())
    assert at >= 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_caught_as_the_sample_is_read(tmp_path, capsys):
    from megatron_wan.data.datasets import PairDataset
    from megatron_wan.data.shards import CorruptSample

    latents = _dataset(tmp_path / "data")
    _flip_a_bit(tmp_path / "data" / "shard-00000.bin", latents["l1"])
    abort = PairDataset(tmp_path / "data", text_len=4)
    assert torch.equal(abort[0]["loser_latent"], latents["l0"])
    with pytest.raises(CorruptSample, match=r"shard-00000.bin: sample 'l1' is corrupted \(CRC32 expected .*pair 'p1'"):
        abort[1]
    skip = PairDataset(tmp_path / "data", text_len=4, on_corrupt="skip")
    item = skip[1]  # the next clean pair of the same latent shape instead, counted
    assert item["id"] == "p2" and item["corrupt_skipped"] == 1 and torch.equal(item["winner_latent"], latents["w2"])
    assert "sample 'l1' is corrupted" in capsys.readouterr().err
    assert skip[1]["corrupt_skipped"] == 0 and skip[2]["corrupt_skipped"] == 0  # counted once
    assert load_config(RECIPE, ["data.on_corrupt=skip"]).data.on_corrupt == "skip"


# -- 17: checkpoints sealed by a manifest --------------------------------------------------------------------

class _FilesEngine:
    """An engine writing files of its own layout (nested folders, one file per rank), as DCP or DeepSpeed do."""

    def __init__(self, step):
        self.step = step

    def save(self, directory):
        import torch.distributed as dist

        rank = dist.get_rank()
        (Path(directory) / "engine" / "shards").mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.full((1000,), float(self.step + rank))},
                   Path(directory) / "engine" / "shards" / f"{rank}.distcp")
        if rank == 0:
            (Path(directory) / "engine" / ".metadata").write_bytes(bytes(range(256)) * 4)


def _save_twice(root):
    """Two checkpoints on every rank; returns the paths this rank fsynced (a path under a checkpoint's temporary
    name can only be opened before that directory is renamed)."""
    import torch.distributed as dist

    from megatron_wan import checkpointing, parallel

    parallel.initialize()
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    os.fsync = fsync
    try:
        for step in (1, 2):
            checkpointing.save(root, step, _FilesEngine(step), {"step": step}, {"rank": dist.get_rank()}, keep_last=3)
    finally:
        os.fsync = real_fsync
    return synced


def test_checkpoints_are_sealed_and_a_bad_newest_one_falls_back(tmp_path, capsys):
    from megatron_wan import checkpointing

    root = tmp_path / "checkpoints"
    synced = set().union(*run_local(_save_twice, 2, root, env={"OMP_NUM_THREADS": "1"}))
    newest = root / "step_000002"
    files = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())
    assert files == ["engine/.metadata", "engine/shards/0.distcp", "engine/shards/1.distcp", "manifest.json",
                     "rank_00000.pt", "rank_00001.pt", "trainer.json"]
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    for name in files[:-4] + files[-3:]:  # every file but the manifest, with its size and SHA-256 (hashlib's)
        data = (newest / name).read_bytes()
        assert manifest[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    # every file and folder was fsynced (by one rank or the other) before the folder was renamed into place
    tmp = os.path.realpath(checkpointing.staging(newest))
    assert {f"{tmp}/{name}" for name in files} | {tmp, f"{tmp}/engine", f"{tmp}/engine/shards"} <= synced
    assert os.path.realpath(root) in synced
    assert checkpointing.latest(root) == newest

    def damaged(how):
        for name in ("engine/shards/1.distcp", "manifest.json"):
            (tmp_path / name.replace("/", "_")).write_bytes((newest / name).read_bytes())
        how(newest)
        found = checkpointing.latest(root)
        for name in ("engine/shards/1.distcp", "manifest.json"):
            (newest / name).write_bytes((tmp_path / name.replace("/", "_")).read_bytes())
        return found, capsys.readouterr().err

    def flip(d):
        _flip_a_bit(d / "engine" / "shards" / "1.distcp", torch.full((1000,), 3.0)[:8])

    def truncate(d):
        (d / "engine" / "shards" / "1.distcp").write_bytes((d / "engine" / "shards" / "1.distcp").read_bytes()[:-9])

    for how, why in ((flip, "engine/shards/1.distcp does not match its SHA-256"),
                     (truncate, "engine/shards/1.distcp has"),
                     (lambda d: (d / "engine" / "shards" / "1.distcp").unlink(), "engine/shards/1.distcp missing"),
                     (lambda d: (d / "manifest.json").unlink(), "no manifest.json")):
        found, err = damaged(how)
        assert found == root / "step_000001", why
        assert f"checkpoint {newest} fails its checks: {why}" in err and "trying the previous one" in err
    assert checkpointing.latest(root) == newest
    (root / "step_000001" / "trainer.json").write_text("{}")
    flip(newest)
    with pytest.raises(FileNotFoundError, match="no checkpoint passes its checks"):
        checkpointing.latest(root)


# -- 15 and 20: a real run, resumed under changed settings ----------------------------------------------------

def _train_cli(models, encoded, out, *overrides, ranks=None):
    """`python -m megatron_wan.train` (or under torchrun with `ranks` processes) on the tiny T2V recipe."""
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks else []
    cmd = [sys.executable, *launcher, "-m", "megatron_wan.train", "--config", str(RECIPE),
           f"model.weights={models['t2v']}", f"data.dir={encoded['t2v']}", f"run.output_dir={out}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_run(models, encoded, tmp_path_factory):
    """4 steps on one process, checkpoints at steps 2 and 4: (output dir, stderr)."""
    out = tmp_path_factory.mktemp("first_run")
    done = _train_cli(models, encoded, out, "run.context_parallel=1", "run.steps=4", "run.save_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


def test_known_harmless_library_warnings_are_silenced(first_run):
    _, err = first_run
    assert "Traceback" not in err
    for message in ("Transformer Engine and Apex are not installed", "full scope is deprecated"):
        assert message not in err


def test_resume_refuses_settings_that_change_the_math(first_run, models, encoded):
    out, _ = first_run
    done = _train_cli(models, encoded, out, "objective.beta=100", "lora.rank=8", "run.steps=6", ranks=2)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "megatron_wan.train: " in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"megatron_wan.train: resume from {out / 'checkpoints' / 'step_000004'}: "
                               f"lora.rank: 4 -> 8; objective.beta: 500.0 -> 100.0 (these change the run's math")
    assert not re.search(r'File ".*megatron_wan', done.stderr), done.stderr[-3000:]  # no traceback from the ranks
    assert json.loads((out / "summary.json").read_text())["steps"] == 4  # nothing was trained or written


def test_resume_falls_back_past_a_damaged_checkpoint_and_reports_changes(first_run, models, encoded):
    out, _ = first_run
    newest = out / "checkpoints" / "step_000004"
    weights = max((p for p in newest.rglob("*") if p.is_file() and p.parent.name == "engine"),
                  key=lambda p: p.stat().st_size)  # the engine's largest file (a DCP shard)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    done = _train_cli(models, encoded, out, "run.context_parallel=1", "run.steps=5", "run.log_every=2",
                      "run.save_every=5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"checkpoint {newest} fails its checks: {weights.relative_to(newest)} does not match its "
            f"SHA-256") in done.stderr
    assert (f"resume from {out / 'checkpoints' / 'step_000002'} with changed settings: run.log_every: 1 -> 2; "
            f"run.save_every: 2 -> 5; run.steps: 4 -> 5") in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_000002") and summary["steps"] == 5
    assert summary["steps_this_launch"] == 3


# -- 19: the context-parallel public forward gives every rank the complete input gradient -----------------------

def _cp_input_grads(state_dict, cp):
    """On each CP rank: input gradients of a replicated loss over the public forward plus a replicated term on the
    inputs, and of the training path's local loss."""
    from wan_reference import inputs

    from megatron_wan import parallel
    from megatron_wan.model import WanModel, preset

    parallel.initialize(context_parallel=cp)
    cfg = preset("tiny")
    model = WanModel.from_diffusers(state_dict, num_heads=cfg.num_heads, cp_comm="ring")
    x, t, text, _ = inputs(cfg, (3, 2, 2), timesteps=(30.0, 700.0), text_len=9)
    x, text = x.requires_grad_(), text.requires_grad_()
    out = model(x, t, text)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ((out * weight).sum() + (x ** 2).sum() + text.sum()).backward()  # composed with replicated computation
    x_local = x.detach().clone().requires_grad_()
    pred, shard = model(x_local, t, text.detach(), gather_output=False)
    (pred * shard.local_latents(weight)).sum().backward()
    return x.grad, text.grad, x_local.grad


def test_cp_public_forward_gives_every_rank_the_whole_input_gradient():
    from wan_reference import inputs, perturbed_reference, rel_err

    from megatron_wan.model import preset

    cfg = preset("tiny")
    ref = perturbed_reference(cfg)
    x, t, text, _ = inputs(cfg, (3, 2, 2), timesteps=(30.0, 700.0), text_len=9)  # 3 frames over CP=2: padded
    x, text = x.requires_grad_(), text.requires_grad_()
    out = ref(x, t, text, return_dict=False)[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ((out * weight).sum() + (x ** 2).sum() + text.sum()).backward()
    model_x = x.grad - 2 * x.detach()  # the model's part of the input gradient
    ranks = run_local(_cp_input_grads, 2, ref.state_dict(), 2, env={"OMP_NUM_THREADS": "1"})
    for dx, dtext, _ in ranks:
        assert rel_err(dx, x.grad) < 1e-5 and rel_err(dtext, text.grad) < 1e-5
    # the training path keeps its convention: each rank its frames' share, summed over CP the whole gradient
    assert all(rel_err(local, model_x) > 0.1 for *_, local in ranks)
    assert rel_err(sum(local for *_, local in ranks), model_x) < 1e-5


# -- 18: a non-finite gradient is skipped for real, by both engines ---------------------------------------------

def poisoned_steps(engine, bf16: bool) -> tuple[list, list]:
    """Three steps of `engine` (over _TwoBlocks), the second with an infinite gradient on rank 1 only: (stepped
    flags, the whole weights after each step)."""
    import torch.distributed as dist

    stepped, weights = [], []
    for poison in (False, True, False):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(len(stepped) + 10 * dist.get_rank()))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = engine.model(x)
        if poison and dist.get_rank() == 1:
            out.register_hook(lambda g: g * float("inf"))
        engine.backward(out.float().pow(2).mean())
        stepped.append(engine.step(0.1)[1])
        weights.append(_full_weights(engine))
    return stepped, weights


def _steps_with_a_poisoned_one(tmp):
    """For each engine and setting: three steps of a tiny model on 2 ranks, the second with an infinite gradient
    on rank 1 only; (stepped flags, weights unchanged by the poisoned step, weights finite and moved after)."""

    from megatron_wan import parallel
    from megatron_wan.config import load_config
    from megatron_wan.engines import build_engine

    parallel.initialize()
    no_zero = Path(tmp) / "no_zero.json"
    no_zero.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0,
                                   "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}))
    settings = {"deepspeed zero3 offload bf16": ["run.engine=deepspeed", "run.dtype=bf16"],
                "deepspeed zero3 fp32": ["run.engine=deepspeed", "run.dtype=fp32", "deepspeed.offload_params=false",
                                         "deepspeed.offload_optimizer=false"],
                "deepspeed no zero fp32": ["run.engine=deepspeed", "run.dtype=fp32", f"deepspeed.config={no_zero}"],
                "megatron fp32": ["run.engine=megatron", "run.dtype=fp32"]}
    results = {}
    for name, overrides in settings.items():
        cfg = load_config(None, [*overrides, "optim.lr=0.1", "run.finetune=full", "lora=null",
                                 "objective.reference=copy"])
        torch.manual_seed(0)
        engine = build_engine(cfg, _TwoBlocks())
        stepped, weights = poisoned_steps(engine, cfg.run.dtype == "bf16")
        results[name] = (stepped, torch.equal(weights[0], weights[1]),
                         bool(torch.isfinite(weights[2]).all()) and not torch.equal(weights[1], weights[2]))
    return results


class _TwoBlocks(torch.nn.Module):
    """The smallest model of the engines' contract: `blocks` (FSDP2 shards each) run in order."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _full_weights(engine) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    def full(p):
        if hasattr(p, "ds_id"):
            return safe_get_full_fp32_param(p)
        return p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2's DTensor shards

    return torch.cat([full(p).detach().float().flatten() for p in engine.module.parameters()])


def test_a_non_finite_gradient_is_skipped_by_both_engines(tmp_path):
    ranks = run_local(_steps_with_a_poisoned_one, 2, str(tmp_path), env={"DS_ACCELERATOR": "cpu",
                                                                          "OMP_NUM_THREADS": "1"})
    for results in ranks:
        for name, (stepped, unchanged, moved_on) in results.items():
            assert stepped == [True, False, True], name  # skipped on every rank, and reported so
            assert unchanged, f"{name}: the non-finite step changed the weights"
            assert moved_on, f"{name}: the next step did not train (gradients left over?)"
