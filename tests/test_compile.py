"""Regional torch.compile (model.compile) against eager on the tiny recipe: the same per-step losses (fp32), T2V
under CP=2 ring with LoRA and activation checkpointing, I2V with LoRA on a dataset of two bucket shapes; compiled
graphs only in the first step of each shape, and as many for the second shape as for the first.

Both Trainers (eager and compiled) run in the same processes, their steps interleaved. Inductor compiles C++ on
CPU, so the shapes are tiny and the runs short. The recipes run at beta = 5: at their beta = 500 a difference of
2e-7 relative in one of the four errors (what fp32 reordering leaves, seen here) moves the Reg-DPO loss by ~1e-4
relative (Eq. 6 amplifies it by beta^2, see test_train), so the loss could not show 1e-5; the errors are checked
to 1e-5 too.
"""

import pytest
import torch
from test_train import ERRORS, RECIPES

from megatron_wan.config import ConfigError, load_config
from megatron_wan.parallel.local import run_local

STEPS = 3


def _compare(config: str, overrides: list, out: str, steps: int) -> list[dict]:
    """Per step: the eager and compiled losses, the batch's latent grid, this process's compile counters after it."""
    from megatron_wan.compile import is_compiled, watch_recompiles
    from megatron_wan.train import Trainer

    trainers = {name: Trainer(load_config(config, [*overrides, f"run.output_dir={out}/{name}",
                                                   f"model.compile={name == 'compiled'}"]))
                for name in ("eager", "compiled")}
    assert is_compiled(trainers["compiled"].engine.module) and not is_compiled(trainers["eager"].engine.module)
    grids = []
    for trainer in trainers.values():
        def record(batches=trainer._micro_batches):
            micro = batches()
            grids.append(list(micro[0].win.shape[2:]))
            return micro
        trainer._micro_batches = record
    log = watch_recompiles()
    rows = []
    for _ in range(steps):
        row, logged, metrics = {}, len(log.lines), {}
        for name, trainer in trainers.items():
            metrics[name] = trainer.train_step()
            row[name] = metrics[name]["loss"]
            row[f"{name}_errors"] = [metrics[name][k] for k in ERRORS]
            trainer.step += 1
        eager_grid, compiled_grid = grids[-2:]
        assert eager_grid == compiled_grid  # the same data order
        assert "compile_graphs" not in metrics["eager"]
        counters = metrics["compiled"]  # the trainer's step metrics: this process's compile counters
        rows.append({**row, "grid": compiled_grid, "graphs": counters["compile_graphs"],
                     "recompiles": counters["recompiles"], "reasons": log.lines[logged:]})
    return rows


def _check_losses(rows):
    for i, r in enumerate(rows):
        assert abs(r["compiled"] - r["eager"]) <= 1e-5 * abs(r["eager"]), f"step {i + 1}: {r}"
        for a, b in zip(r["compiled_errors"], r["eager_errors"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), f"step {i + 1}: {r}"


def test_compiled_equals_eager_t2v_cp2_ring_lora_recompute(models, encoded, tmp_path):
    overrides = [f"model.weights={models['t2v']}", f"data.dir={encoded['t2v']}", "run.context_parallel=2",
                 "model.cp_comm=ring", "model.recompute=true", "run.tensorboard=false", "run.resume=false",
                 "objective.beta=5"]
    per_rank = run_local(_compare, 2, str(RECIPES["t2v"]), overrides, str(tmp_path), STEPS,
                         env={"OMP_NUM_THREADS": "1"})
    for rows in per_rank:
        _check_losses(rows)
        first = rows[0]
        assert first["graphs"] > 0
        assert all((r["graphs"], r["recompiles"]) == (first["graphs"], first["recompiles"]) for r in rows), rows


def test_compiled_equals_eager_i2v_lora_two_buckets(tmp_path):
    from megatron_wan.bench.sweep import write_dataset

    data = write_dataset(tmp_path / "data", (2, 4, 4), pairs=4, task="i2v", buckets=[(2, 4, 6)])
    overrides = ["model.weights=null", "model.preset=tiny-i2v", f"data.dir={data}", "data.text_len=32",
                 "run.context_parallel=1", "run.tensorboard=false", "run.resume=false", "objective.beta=5",
                 "model.recompute=true"]
    (rows,) = run_local(_compare, 1, str(RECIPES["i2v"]), overrides, str(tmp_path), 4, env={"OMP_NUM_THREADS": "2"})
    _check_losses(rows)
    added, seen, before = {}, set(), 0
    for r in rows:
        grid = tuple(r["grid"])
        if grid in seen:
            assert r["graphs"] == before, f"recompiled for a shape already seen: {rows}"
        else:
            seen.add(grid)
            added[grid] = r["graphs"] - before
            if len(seen) == 2:  # logged, with dynamo's reason
                assert any("size mismatch" in line for line in r["reasons"]), r["reasons"]
        before = r["graphs"]
    assert len(added) == 2, f"expected both bucket shapes in {rows}"
    first, second = added.values()
    assert first > 0 and second == first, added


@pytest.mark.parametrize("override, key", [("model.compile=maybe", "model.compile"),
                                           ("model.compile_mode=reduce-overhead", "model.compile_mode")])
def test_bad_compile_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_deepspeed_engine_refuses_compile():
    with pytest.raises(ConfigError, match="model.compile"):
        load_config(None, ["model.compile=true", "run.engine=deepspeed"])


def test_compile_settings_may_change_on_resume():
    from megatron_wan.config import resume_changes

    saved = load_config(None, []).to_dict()
    refused, allowed = resume_changes(saved, load_config(None, ["model.compile=true",
                                                                "model.compile_mode=max-autotune-no-cudagraphs"]))
    assert not refused and len(allowed) == 2


def test_blocks_compile_in_place():
    from megatron_wan import parallel
    from megatron_wan.compile import compile_blocks
    from megatron_wan.models.wan21 import WanModel, preset

    parallel.initialize()
    model = WanModel(preset("tiny"))
    names = [n for n, _ in model.named_parameters()]
    compile_blocks(model)
    assert [n for n, _ in model.named_parameters()] == names  # state dicts and checkpoints unchanged
    assert all(isinstance(b, torch.nn.Module) and type(b).__name__ == "WanBlock" for b in model.blocks)
    with pytest.raises(ValueError, match="compile_mode"):
        compile_blocks(model, "fast")
