"""Batch sampling by shape bucket, sharded over data-parallel ranks, exactly resumable."""

import hashlib
from collections.abc import Hashable, Iterator, Sequence

import torch


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # a stable mix of (seed, epoch): unlike seed + epoch, (0, 1) and (1, 0) give unrelated orders
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class BucketBatchSampler:
    """Yields lists of dataset indices; every batch holds indices of one shape key only.

    Each epoch, from (seed, epoch) alone: indices are grouped by shape key (buckets in order of first
    appearance), each bucket is shuffled and cut into global batches of batch_size * dp_size, the
    global batches of all buckets are shuffled together, and rank r takes slice r (batch_size indices)
    of each. All ranks thus yield the same number of batches and together see each kept index once.

    A bucket's remainder (its size modulo batch_size * dp_size) is dropped when drop_last; otherwise
    it is completed into a full global batch by repeating that bucket's shuffled indices from its start
    (cyclically when the bucket is smaller than the gap), so some indices are seen twice.

    Iterating yields the rest of the current epoch from `batches_seen` (advanced before each yield,
    so a state_dict taken after receiving a batch resumes after it); when the epoch is exhausted the
    sampler moves to the next epoch at position 0. `set_epoch(e)` with a different epoch restarts at
    position 0 of e; with the current epoch it keeps the position (so the usual `set_epoch` loop
    resumes correctly after `load_state_dict`). Use one iterator at a time.
    """

    def __init__(self, shapes: Sequence[Hashable], batch_size: int, *, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, drop_last: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, found {batch_size!r}")
        if not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size must be an int >= 1, found {dp_size!r}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be an int in [0, dp_size={dp_size}), found {dp_rank!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, found {seed!r}")
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.seed, self.drop_last = seed, drop_last
        self._buckets: dict[Hashable, list[int]] = {}
        for i, shape in enumerate(shapes):
            try:
                self._buckets.setdefault(shape, []).append(i)
            except TypeError as e:
                raise TypeError(f"shapes[{i}] = {shape!r} is not hashable") from e
        self.epoch = 0
        self.batches_seen = 0

    def _global_batches(self, epoch: int) -> list[list[int]]:
        g = _epoch_generator(self.seed, epoch)
        size = self.batch_size * self.dp_size
        batches = []
        for bucket in self._buckets.values():
            shuffled = [bucket[i] for i in torch.randperm(len(bucket), generator=g).tolist()]
            rem = len(shuffled) % size
            if rem and self.drop_last:
                shuffled = shuffled[:len(shuffled) - rem]
            elif rem:
                shuffled += [shuffled[i % len(shuffled)] for i in range(size - rem)]
            batches += [shuffled[i:i + size] for i in range(0, len(shuffled), size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __len__(self) -> int:
        size = self.batch_size * self.dp_size
        rounding = 0 if self.drop_last else size - 1
        return sum((len(b) + rounding) // size for b in self._buckets.values())

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.dp_rank * self.batch_size
        for batch in self._global_batches(self.epoch)[self.batches_seen:]:
            self.batches_seen += 1
            yield batch[lo:lo + self.batch_size]
        self.epoch += 1
        self.batches_seen = 0

    def set_epoch(self, epoch: int):
        """Move to `epoch` at position 0; the current epoch keeps its position."""
        if epoch != self.epoch:
            self.epoch, self.batches_seen = epoch, 0

    def state_dict(self) -> dict:
        """Position to resume from: {"epoch", "batches_seen", "seed", "global_batch"} (JSON-serializable). It
        counts global batches, so any data-parallel layout with the same global batch resumes from it."""
        return {"epoch": self.epoch, "batches_seen": self.batches_seen, "seed": self.seed,
                "global_batch": self.batch_size * self.dp_size}

    def load_state_dict(self, state: dict):
        """Resume at a saved position, on any dp_size; the seed and the global batch must match this sampler's."""
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler was built with seed {self.seed}")
        global_batch = self.batch_size * self.dp_size
        if state.get("global_batch", global_batch) != global_batch:
            raise ValueError(f"sampler state has a global batch of {state['global_batch']} samples, this sampler "
                             f"{global_batch} (batch_size {self.batch_size} x dp_size {self.dp_size}): keep "
                             f"run.global_batch_size to resume on another data-parallel size")
        if not 0 <= state["batches_seen"] <= len(self):
            raise ValueError(f"sampler state batches_seen={state['batches_seen']} outside [0, {len(self)}] "
                             "(dataset, batch_size or dp_size changed?)")
        self.epoch, self.batches_seen = state["epoch"], state["batches_seen"]
