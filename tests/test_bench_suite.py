"""The benchmark entry: the sweep (--quick) writes its table and chart with measured numbers in every row; the MFU
suite, at a small size, reports ours and diffusers side by side; pair_mode ranks trains whole pairs. No timed
asserts: the figures are measured, their values depend on the machine."""

import json
import math

import pytest
import torch

from megatron_wan.bench.__main__ import main as bench
from megatron_wan.bench.sweep import ROWS, write_dataset
from megatron_wan.parallel.local import run_local


def test_quick_sweep_writes_its_table_and_chart(tmp_path):
    rows = bench(["sweep", "--quick", "--out", str(tmp_path)])
    assert [r["name"] for r in rows] == [r.name for r in ROWS]
    for row in rows:
        m = row["metrics"]
        figures = (row["step_s"], row["memory_bytes"], m["samples_per_s"], m["tokens_per_s"], m["tflops"], m["mfu"])
        assert all(math.isfinite(v) and v > 0 for v in figures), row
        assert m["skipped"] == 0 and math.isfinite(m["loss"])
    table = (tmp_path / "sweep.md").read_text()
    assert all(f"| {r.name} |" in table for r in ROWS)
    assert "nan" not in table and "inf" not in table
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == json.loads(json.dumps(rows))
    saved = {r["name"]: r["memory_bytes"] for r in rows}
    assert saved["sequential"] < saved["baseline"] and saved["ranks"] < saved["baseline"]  # one member at a time
    assert saved["recompute"] < saved["baseline"] and saved["cp4"] < saved["cp2"] < saved["baseline"]
    state = {r["name"]: r["state_bytes"] for r in rows}  # exact: FSDP2 over 2 ranks halves it (but the step counters)
    assert state["dp-shard-2"] < 0.52 * state["baseline"] and state["full-dp-shard-2"] < 0.52 * state["full"]
    assert state["deepspeed"] is None and state["full"] > 3 * state["baseline"]  # full: gradients, moments of all


def test_mfu_reports_ours_and_diffusers(tmp_path):
    results = bench(["mfu", "--dim", "256", "--heads", "2", "--ffn", "512", "--layers", "1", "--text-dim", "64",
                     "--grid", "2", "8", "8", "--text-len", "32", "--rounds", "1", "--out", str(tmp_path)])
    assert set(results) == {"fp32", "bf16"}
    for figures in results.values():
        assert figures["peak"] > 0
        for name in ("diffusers", "ours", "regdpo"):
            assert figures[name]["seconds"] > 0 and 0 < figures[name]["mfu"] < math.inf
        assert figures["regdpo"]["flops"] == pytest.approx(8 / 3 * figures["ours"]["flops"], rel=0.01)
    table = (tmp_path / "mfu.md").read_text()
    assert "| fp32 |" in table and "| bf16 |" in table and "diffusers MFU" in table


def test_unknown_suite_is_named():
    with pytest.raises(SystemExit, match="unknown suite 'nope'"):
        bench(["nope"])


def _ranks_batches(data):
    from megatron_wan.config import load_config
    from megatron_wan.train import Trainer

    cfg = load_config(None, ["model.preset=tiny", "run.finetune=lora", "objective.pair_mode=ranks", f"data.dir={data}",
                             f"run.output_dir={data.parent / 'run'}", "run.tensorboard=false", "run.resume=false"])
    trainer = Trainer(cfg)
    return torch.tensor([trainer._micro_batches()[0].sample_ids for _ in range(4)])


def test_pair_mode_ranks_gives_partners_the_same_pairs(tmp_path):
    data = write_dataset(tmp_path / "data", (2, 4, 4), pairs=8)
    first, second = run_local(_ranks_batches, 2, data, env={"OMP_NUM_THREADS": "1"})
    assert torch.equal(first, second)  # winner on one rank, loser of the same pair on its partner
    assert len(set(first.flatten().tolist())) == 4  # and successive steps move on to other pairs
