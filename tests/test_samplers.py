"""BucketBatchSampler: one shape per batch, disjoint data-parallel slices, determinism, exact resume."""

import json
from collections import Counter

import pytest

from megatron_wan.data.samplers import BucketBatchSampler

# three resolutions in interleaved order: 8, 8 and 4 samples
SHAPES = [(16, 21, 60, 104), (16, 21, 90, 160), (16, 5, 90, 160)] * 4 + [(16, 21, 60, 104), (16, 21, 90, 160)] * 4


def take(sampler, n):
    """The next n batches, iterating into following epochs as needed (stops mid-epoch, like a crash)."""
    out = []
    while len(out) < n:
        for batch in sampler:
            out.append(batch)
            if len(out) == n:
                break
    return out


def ranks(shapes, batch_size, dp_size=2, **kw):
    return [BucketBatchSampler(shapes, batch_size, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]


def test_batches_hold_one_shape_and_ranks_cover_each_index_once():
    samplers = ranks(SHAPES, batch_size=2)
    per_rank = [list(s) for s in samplers]
    assert len(per_rank[0]) == len(per_rank[1]) == len(samplers[0]) == len(SHAPES) // 4
    for batches in per_rank:
        for batch in batches:
            assert len(batch) == 2
            assert len({SHAPES[i] for i in batch}) == 1, batch
    # rank slices of one step come from the same global batch, hence the same shape
    for b0, b1 in zip(*per_rank):
        assert SHAPES[b0[0]] == SHAPES[b1[0]]
    seen = Counter(i for batches in per_rank for batch in batches for i in batch)
    assert seen == Counter(range(len(SHAPES)))


def test_drop_last_drops_each_bucket_remainder():
    shapes = ["a"] * 9 + ["b"] * 6 + ["c"] * 3  # global batch 4: remainders 1, 2, 3
    samplers = ranks(shapes, batch_size=2)
    seen = Counter(i for s in samplers for batch in s for i in batch)
    assert max(seen.values()) == 1
    assert len(seen) == len(shapes) - (1 + 2 + 3)
    assert len(samplers[0]) == 2 + 1 + 0


def test_without_drop_last_remainders_are_padded_from_their_bucket():
    shapes = ["a"] * 9 + ["b"] * 6 + ["c"] * 3
    samplers = ranks(shapes, batch_size=2, drop_last=False)
    per_rank = [list(s) for s in samplers]
    assert len(per_rank[0]) == len(samplers[0]) == 3 + 2 + 1
    seen = Counter(i for batches in per_rank for batch in batches for i in batch)
    assert set(seen) == set(range(len(shapes)))
    assert sum(seen.values()) == 4 * len(per_rank[0])
    for batches in per_rank:
        assert all(len(batch) == 2 and len({shapes[i] for i in batch}) == 1 for batch in batches)


def test_order_depends_on_seed_and_epoch_only():
    def epoch(seed, e):
        s = BucketBatchSampler(SHAPES, 2, seed=seed)
        s.set_epoch(e)
        return list(s)

    assert epoch(0, 3) == epoch(0, 3)
    assert epoch(0, 3) != epoch(0, 4)
    assert epoch(0, 3) != epoch(1, 3)


def test_iteration_advances_to_the_next_epoch_and_set_epoch_restarts_one():
    s = BucketBatchSampler(SHAPES, 2)
    first, second = list(s), list(s)
    assert s.state_dict() == {"epoch": 2, "batches_seen": 0, "seed": 0, "global_batch": 2}
    take(s, 2)
    s.set_epoch(1)
    assert list(s) == second != first


@pytest.mark.parametrize("stop", [3, 10, 13])  # mid-epoch, last batch of epoch 0, into epoch 1
def test_resume_continues_with_the_uninterrupted_batches(stop):
    full = [take(s, 24) for s in ranks(SHAPES, batch_size=1, seed=7)]  # 10 global batches per epoch
    for rank, s in enumerate(ranks(SHAPES, batch_size=1, seed=7)):
        assert take(s, stop) == full[rank][:stop]
        state = json.loads(json.dumps(s.state_dict()))
        fresh = BucketBatchSampler(SHAPES, 1, dp_rank=rank, dp_size=2, seed=7)
        fresh.load_state_dict(state)
        fresh.set_epoch(state["epoch"])  # a training loop's set_epoch keeps the resumed position
        assert take(fresh, 24 - stop) == full[rank][stop:]


def test_invalid_arguments_and_state_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(SHAPES, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        BucketBatchSampler(SHAPES, 2, dp_rank=2, dp_size=2)
    with pytest.raises(TypeError, match=r"shapes\[1\]"):
        BucketBatchSampler([(1,), [2]], 1)
    with pytest.raises(ValueError, match="seed 1"):
        BucketBatchSampler(SHAPES, 2).load_state_dict({"epoch": 0, "batches_seen": 0, "seed": 1})
    with pytest.raises(ValueError, match="batches_seen=99"):
        BucketBatchSampler(SHAPES, 2).load_state_dict({"epoch": 0, "batches_seen": 99, "seed": 0})
