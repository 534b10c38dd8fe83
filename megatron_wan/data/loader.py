"""Batches of pairs for the trainer: a torch DataLoader with BucketBatchSampler as its batch sampler, `num_workers`
worker processes reading `prefetch` batches ahead each, pinned host memory for non-blocking copies to CUDA.

The DataLoader draws index batches from the sampler ahead of training (what it prefetches), so the sampler's own
position runs ahead. The position to resume from is counted here instead, from the batches handed to the trainer:
`PairLoader.state_dict()` is the sampler state just after the last batch returned, whatever was prefetched.
"""

import signal

import torch
from torch.utils.data import DataLoader, Dataset

from megatron_wan.objectives.pair_step import Conditions, PairBatch
from megatron_wan.preemption import STOP_SIGNALS


class _Indexed(Dataset):
    """Items of `dataset` carrying their index (what the flow-matching draws are keyed on)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "index": i}


def collate(items: list[dict]) -> dict:
    """Items of PairDataset -> {"index": [int], "id": [str], "corrupt_skipped": int, tensor field: stacked [B, ...]}."""
    batch = {"index": [it["index"] for it in items], "id": [it["id"] for it in items],
             "corrupt_skipped": sum(it.get("corrupt_skipped", 0) for it in items)}
    for name, value in items[0].items():
        if isinstance(value, torch.Tensor):
            batch[name] = torch.stack([it[name] for it in items])
    return batch


def micro_batches(batch: dict, size: int) -> list[dict]:
    """A collated batch cut into consecutive micro-batches of `size` items (gradient accumulation)."""
    return [{name: value[i:i + size] if isinstance(value, (list, torch.Tensor)) else value
             for name, value in batch.items()} for i in range(0, len(batch["index"]), size)]


def to_pair_batch(batch: dict, device, with_loser: bool = True, non_blocking: bool = False) -> PairBatch:
    """A collated batch on `device` in float32 (the loser left out when not `with_loser`, as SFT needs)."""
    def move(name):
        return batch[name].to(device, torch.float32, non_blocking=non_blocking) if name in batch else None

    conditions = Conditions(move("text_emb"), move("clip_emb"), move("cond_latent"))
    return PairBatch(move("winner_latent"), move("loser_latent") if with_loser else None, conditions,
                     list(batch["index"]))


def _ignore_stop_signals(_worker_id):
    # SLURM signals every process of the job: a worker must outlive the trainer's save, which it leaves to the
    # main process (a worker killed by SIGTERM would abort the DataLoader instead)
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class PairLoader:
    """Endless batches of `dataset` in `sampler`'s order (epoch after epoch), read by `num_workers` processes."""

    def __init__(self, dataset, sampler, *, num_workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
        self.sampler = sampler
        workers = num_workers > 0
        self.loader = DataLoader(_Indexed(dataset), batch_sampler=sampler, num_workers=num_workers,
                                 collate_fn=collate, pin_memory=pin_memory,
                                 prefetch_factor=prefetch if workers else None, persistent_workers=workers,
                                 worker_init_fn=_ignore_stop_signals if workers else None)
        self._iterator = None
        self._position = sampler.state_dict()

    def _start(self):
        self._position = self.sampler.state_dict()  # before the DataLoader's iterator starts prefetching
        self._iterator = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:  # the sampler has moved on to the next epoch
            self._start()
            batch = next(self._iterator)
        self._position = {**self._position, "batches_seen": self._position["batches_seen"] + 1}
        return batch

    def state_dict(self) -> dict:
        """The sampler state just after the last batch returned (the sampler's own state_dict format)."""
        return dict(self._position)

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; call before the first batch."""
        if self._iterator is not None:
            raise RuntimeError("PairLoader.load_state_dict: batches were already drawn")
        self.sampler.load_state_dict(state)
        self._position = self.sampler.state_dict()
