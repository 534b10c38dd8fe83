"""FSDP2 in the Megatron engine (run.dp_shard), gradient accumulation (run.global_batch_size) and DCP checkpoints.

The tiny Reg-DPO recipe on synthetic encoded pairs (bench.sweep.write_dataset, 8 pairs) and the tiny random model
folder, 6 steps: dp_shard 2 and 4 against 1 on the same ranks (LoRA and full, T2V and I2V, CP=2 and TP=2 on 4
ranks); 2 ranks x 2 micro-batches against 4 ranks x 1; kill -9 mid-run and re-launch; a 2-rank checkpoint resumed
on 1 and 4 ranks; its export loaded by diffusers; exact bytes per rank. Tolerances: 1e-5 relative; the layouts
differ only in the order of fp32 sums (~1e-7), which the loss amplifies by ~beta^2 / 4 (see test_train's note):
beta 50 here, where the recipe's 500 would leave ~3e-5 between any two layouts, sharded or not.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from wan_reference import inputs, rel_err

from megatron_wan.bench.sweep import write_dataset
from megatron_wan.data.samplers import BucketBatchSampler
from megatron_wan.parallel.local import run_local

REPO = Path(__file__).parent.parent
RECIPE = {"t2v": REPO / "configs" / "tiny-t2v-regdpo.yaml", "i2v": REPO / "configs" / "tiny-i2v-regdpo.yaml"}
FULL = ("run.finetune=full", "lora=null", "objective.reference=copy")
LORA_T2V = "t2v-lora-accumulated"  # the 2-rank run: global batch 4 as 2 ranks x 2 micro-batches, dp_shard 2


def args(task, models, data, out, *overrides):
    return ["--config", str(RECIPE[task]), f"model.weights={models[task]}", f"data.dir={data[task]}",
            "data.text_len=32", "objective.beta=50", f"run.output_dir={out}", "run.tensorboard=false", "run.steps=6",
            "run.save_every=3", "run.context_parallel=1", *overrides]


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _train_all(runs: dict) -> dict:
    """Every run of `runs` ({name: argv}) in these processes, one after the other; {name: metrics rows}."""
    from megatron_wan.train import main

    found = {}
    for name, argv in runs.items():
        summary = main(argv)
        found[name] = _rows(summary["output_dir"])
    return found


def train_all(world, runs):
    return run_local(_train_all, world, runs, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})[0]


def close(a: list[dict], b: list[dict], keys=("loss", "grad_norm"), rel=1e-5):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=rel), (x["step"], k, x[k], y[k])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-data")
    return {task: write_dataset(root / task, (4, 8, 8), pairs=8, task=task) for task in ("t2v", "i2v")}


@pytest.fixture(scope="module")
def runs(models, data, tmp_path_factory):
    """{name: metrics rows}, and the output dirs under "dirs"."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    found = {}
    acc = args("t2v", models, data, root / LORA_T2V, "run.global_batch_size=4", "run.dp_shard=2")
    found.update(train_all(2, {LORA_T2V: acc}))
    for target in ("resume-on-1", "resume-on-4"):  # the 2-rank checkpoint of step 3, resumed on other sizes
        ckpt = root / target / "checkpoints"
        shutil.copytree(root / LORA_T2V / "checkpoints" / "step_000003", ckpt / "step_000003")
        (ckpt / "latest").write_text("step_000003")
    found.update(train_all(1, {"resume-on-1": args("t2v", models, data, root / "resume-on-1",
                                                     "run.global_batch_size=4")}))
    four = {"resume-on-4": args("t2v", models, data, root / "resume-on-4", "run.dp_shard=4")}
    for shard in (1, 2, 4):
        four[f"t2v-lora-{shard}"] = args("t2v", models, data, root / f"t2v-lora-{shard}", f"run.dp_shard={shard}")
        four[f"t2v-full-{shard}"] = args("t2v", models, data, root / f"t2v-full-{shard}", f"run.dp_shard={shard}",
                                         *FULL)
    found.update(train_all(4, four))
    cp2 = {}
    for shard in (1, 2, 4):
        cp2[f"i2v-lora-cp2-{shard}"] = args("i2v", models, data, root / f"i2v-lora-cp2-{shard}",
                                            "run.context_parallel=2", f"run.dp_shard={shard}")
    for shard in (1, 4):
        cp2[f"i2v-full-cp2-{shard}"] = args("i2v", models, data, root / f"i2v-full-cp2-{shard}",
                                            "run.context_parallel=2", f"run.dp_shard={shard}", *FULL)
    found.update(train_all(4, cp2))
    tp2 = {}
    for shard in (1, 2):
        tp2[f"t2v-full-tp2-{shard}"] = args("t2v", models, data, root / f"t2v-full-tp2-{shard}",
                                            "run.tensor_parallel=2", f"run.dp_shard={shard}", *FULL)
        tp2[f"i2v-lora-tp2-{shard}"] = args("i2v", models, data, root / f"i2v-lora-tp2-{shard}",
                                            "run.tensor_parallel=2", f"run.dp_shard={shard}",
                                            "objective.pair_mode=sequential")
    found.update(train_all(4, tp2))
    found["dirs"] = root
    return found


@pytest.mark.parametrize("name, shards", [
    ("t2v-lora", (2, 4)), ("t2v-full", (2, 4)), ("i2v-lora-cp2", (2, 4)), ("i2v-full-cp2", (4,)),
    ("t2v-full-tp2", (2,)), ("i2v-lora-tp2", (2,)),
])
def test_dp_shard_equals_replicated(runs, name, shards):
    base = runs[f"{name}-1"]
    assert [r["step"] for r in base] == list(range(1, 7)) and base[-1]["loss"] != base[0]["loss"]
    for shard in shards:
        close(runs[f"{name}-{shard}"], base)


def test_accumulation_2x2_equals_4x1(runs):
    close(runs[LORA_T2V], runs["t2v-lora-1"])


def test_resume_on_another_data_parallel_size(runs):
    straight = runs[LORA_T2V]
    for target in ("resume-on-1", "resume-on-4"):
        rows = runs[target]
        assert [r["step"] for r in rows] == [4, 5, 6], target
        close(rows, straight[3:])


def test_resharded_sampler_sees_every_pair_once():
    """A 2-rank sampler's position (global batch 4) continued on 1 and 4 ranks: the same global batches follow."""
    shapes = [(16, 4, 8, 8)] * 8 + [(16, 2, 8, 8)] * 4
    two = [BucketBatchSampler(shapes, 2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    its = [iter(s) for s in two]
    seen = [i for _ in range(1) for it in its for i in next(it)]
    state = two[0].state_dict()
    for dp in (1, 4):
        rest = [BucketBatchSampler(shapes, 4 // dp, dp_rank=r, dp_size=dp, seed=3) for r in range(dp)]
        for s in rest:
            s.load_state_dict(state)
        after = [i for batches in zip(*rest) for b in batches for i in b]
        assert sorted(seen + after) == list(range(12)), dp  # the epoch: every pair once
    with pytest.raises(ValueError, match="global batch of 4 samples, this sampler 2"):
        BucketBatchSampler(shapes, 1, dp_rank=0, dp_size=2, seed=3).load_state_dict(state)


def test_kill_9_then_relaunch_is_bit_identical(runs, models, data, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_wan.train",
           *args("t2v", models, data, out, "run.global_batch_size=4", "run.dp_shard=2")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log, deadline = out / "metrics.jsonl", time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 4) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, no chance to save
    proc.wait(timeout=60)
    assert (out / "checkpoints" / "latest").read_text() == "step_000003"
    assert subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=600).returncode == 0
    rows, straight = _rows(out), runs[LORA_T2V]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for k in ("loss", "grad_norm", "model_err_w", "model_err_l"):
        assert [r[k] for r in rows] == [r[k] for r in straight], k  # bit for bit


def test_export_of_sharded_checkpoint_loads_in_diffusers(runs, models, tmp_path):
    from diffusers import WanPipeline

    from megatron_wan.export import export
    from megatron_wan.model import preset

    x, t, text, _ = inputs(preset("tiny"), (2, 4, 4), timesteps=(300.0,))
    out = {}
    for name in (LORA_T2V, "t2v-lora-1"):  # dp_shard 2 on 2 ranks; replicated on 4 ranks: the same 6 steps
        written = export(runs["dirs"] / name, tmp_path / name, formats=["diffusers"])
        pipe = WanPipeline.from_pretrained(models["t2v"])
        with torch.no_grad():
            base = pipe.transformer(x, t, text, return_dict=False)[0]
            pipe.load_lora_weights(written["diffusers"])
            out[name] = pipe.transformer(x, t, text, return_dict=False)[0]
        assert rel_err(out[name], base) > 1e-4  # the adapters are loaded and matter
    assert rel_err(out[LORA_T2V], out["t2v-lora-1"]) < 1e-5


def test_exact_bytes_per_rank():
    """dp_shard 2 and 4 hold at most 0.52x and 0.27x of the replicated bytes; the planner predicts them."""
    from megatron_wan.bench import plan
    from megatron_wan.bench.fsdp_memory import measure
    from megatron_wan.model import preset
    from megatron_wan.models.wan21 import SPEC
    from megatron_wan.models.wan21.adapter import param_table

    rows = {r["dp_shard"]: r for r in measure(4, (1, 2, 4), "full", "tiny")}
    params = [math.prod(p.shape) for p in param_table(preset("tiny"))]
    numel = sum(params)
    # replicated: fp32 weights and gradients, AdamW's two moments and one fp32 step counter per parameter
    assert rows[1]["parameters"] == rows[1]["gradients"] == 4 * numel
    assert rows[1]["optimizer"] == 8 * numel + 4 * len(params)
    assert rows[2]["ratio"] <= 0.52 and rows[4]["ratio"] <= 0.27, rows
    for shard, row in rows.items():  # the planner's: these bytes, but for the largest rank's dim-0 rounding (< 2%)
        predicted = plan.sharded_state_bytes(SPEC.parameters(preset("tiny")), "full", 0, shard)
        for ours, theirs in (("weights", "parameters"), ("grads", "gradients"), ("optimizer", "optimizer")):
            assert predicted[ours] == pytest.approx(row[theirs], rel=0.02), (shard, ours)
