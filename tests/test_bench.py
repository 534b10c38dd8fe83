"""The exact activation meter, and the pair-mode bench's memory ratio (bytes, not time)."""

import pytest
import torch

from megatron_wan.bench import activation_memory, pair_modes
from megatron_wan.bench.meters import SavedTensorMeter


def test_meter_counts_saved_storages_once_and_releases_them():
    w = torch.randn(1000, requires_grad=True)
    x = torch.randn(1000)
    with SavedTensorMeter(exclude=[w]) as meter:
        y = (x * w).exp()  # mul saves x (and w, excluded); exp saves its output
        z = y * 2 + y.sin().sum()  # sin saves y again: same storage, counted once
    assert meter.peak == meter.total == 2 * 1000 * 4
    z.sum().backward()
    del y, z
    assert meter.current == 0


def test_sequential_pairs_hold_one_sample_of_activations():
    summary = pair_modes.main(["--grid", "2", "4", "4", "--pairs", "2", "--layers", "1", "--repeats", "1"])
    # batched keeps 2 pairs x 2 members of activations, sequential one sample: a quarter
    assert summary["sequential_vs_batched_saved_bytes"] == pytest.approx(0.25, abs=0.02)


def test_activation_memory_falls_with_context_parallel_size():
    summary = activation_memory.main(["--grid", "8", "16", "16", "--text-len", "16", "--repeats", "0"])
    # video tokens split over ranks; only the (whole) text tokens and embeddings stay on every rank
    assert 0.5 < summary["saved_ratio_cp2"] <= 0.55
    assert 0.25 < summary["saved_ratio_cp4"] <= 0.30
