"""Validation during training: the objective's metrics on held-out pairs, without a gradient, at a fixed (t, eps) per
pair drawn from the pair's id, so that two validations of the same weights give identical numbers and a resumed run
logs what an uninterrupted one does.

Every rank takes part. The pairs are dealt round-robin over the data-parallel ranks (the ranks of one CP / TP group
evaluate the same pair together); a rank short of a pair evaluates a repeat and drops it, so that every rank runs
the same forwards (sharded engines need that). The per-pair errors of the whole split are gathered and the metrics
computed from them at once: means over the whole split, whatever the layout.
"""

import hashlib
import math
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_wan.config import ConfigError
from megatron_wan.data.loader import collate, to_pair_batch
from megatron_wan.objectives.pair_step import PairObjective

VALIDATION_STEP = -1  # the flow-matching step of every validation draw; training draws steps >= 0, never this one


def val_pairs_path(cfg) -> Path | None:
    """The held-out pairs this run reads (data.val_pairs, default DIR/test.jsonl), or None when it needs none;
    a missing or empty file is a ConfigError naming data.val_pairs."""
    run = cfg.run
    if not (run.validate_every or (run.sample_every and not run.sample_prompts)):
        return None
    path = Path(cfg.data.val_pairs or Path(cfg.data.dir) / "test.jsonl")
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        raise ConfigError(f"data.val_pairs: {path} is missing or empty; validation (run.validate_every) and samples "
                          "without run.sample_prompts need held-out pairs")
    return path


def pair_seed(pair_id: str) -> int:
    """A 63-bit integer of the pair's id: the sample id its (t, eps) are drawn with."""
    return int.from_bytes(hashlib.sha256(str(pair_id).encode()).digest()[:8], "little") >> 1


class Validator:
    """The first `limit` pairs of `dataset` (a PairDataset), evaluated by `objective` (see the module)."""

    def __init__(self, dataset, limit: int, objective: PairObjective, device, *, autocast: bool = False,
                 group=None):
        self.dataset, self.objective, self.device, self.autocast = dataset, objective, device, autocast
        self.count = min(limit, len(dataset))
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    @torch.no_grad()
    def __call__(self, model, reference) -> dict:
        """{"val/METRIC": mean over the validation pairs} of `model` (and `reference`) as they are now."""
        per_rank = math.ceil(self.count / self.size)
        rows = []
        for k in range(per_rank):
            i = self.rank + k * self.size
            item = self.dataset[i % self.count]
            batch = to_pair_batch(collate([{**item, "index": pair_seed(item["id"])}]), self.device,
                                  self.objective.mode != "sft")
            sigma, eps = self.objective.flow.draw(VALIDATION_STEP, batch.sample_ids, batch.win.shape[1:])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                errors = self.objective.errors(model, reference, batch, sigma.to(self.device), eps.to(self.device))
            valid = torch.full((1, 1), float(i < self.count), device=self.device)
            rows.append(torch.cat([valid, errors], dim=1))
        mine = torch.cat(rows)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.group)
        everything = torch.stack(parts, dim=1).flatten(0, 1)  # pair order: k-major, rank-minor = the split's order
        errors = everything[everything[:, 0] > 0, 1:].cpu()
        return {f"val/{name}": value for name, value in self.objective.metrics(errors).items()}
