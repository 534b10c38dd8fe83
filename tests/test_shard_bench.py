"""The shard read bench runs end to end on a tiny size and reports both sides and their ratio."""

import pytest

from megatron_wan.bench import shard_read


def test_shard_read_bench_reports_both_throughputs_and_ratio(tmp_path, capsys):
    summary = shard_read.main(["--sizes", "tiny", "--samples", "3", "--repeats", "1", "--dir", str(tmp_path)])
    assert set(summary) == {"tiny_shards_samples_per_s", "tiny_torch_save_samples_per_s", "tiny_shards_vs_torch_save"}
    assert summary["tiny_shards_samples_per_s"] > 0 and summary["tiny_torch_save_samples_per_s"] > 0
    assert summary["tiny_shards_vs_torch_save"] == pytest.approx(
        summary["tiny_shards_samples_per_s"] / summary["tiny_torch_save_samples_per_s"])
    assert "16x1x4x4" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # the temporary files are gone
