"""Checkpoint directories: `OUT/checkpoints/step_000300/`, written under a temporary name and renamed when every
rank has written its part, the newest K kept, `latest` pointing at the newest complete one.

A checkpoint holds the engine's files (trainable weights, optimizer), `trainer.json` (step, counters, config,
world size, the sampler's global position) and per rank `rank_R.pt` (RNG states), all loadable without pickle
(torch.load weights_only, JSON). Every rank must call `save` (it synchronizes).
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_rest": list(np.random.get_state()[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), *state["numpy_rest"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest(root) -> Path | None:
    """The newest complete checkpoint under `root` (OUT/checkpoints), or None."""
    pointer = Path(root) / "latest"
    if pointer.exists():
        path = Path(root) / pointer.read_text().strip()
        if (path / "trainer.json").exists():
            return path
    done = sorted(p for p in Path(root).glob("step_*") if (p / "trainer.json").exists())
    return done[-1] if done else None


def save(root, step: int, engine, trainer_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` (every rank calls this); returns its path."""
    root = Path(root)
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save(tmp)
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load(path, engine) -> tuple[dict, dict]:
    """Restore the engine from checkpoint `path`; returns (trainer_state, this rank's state, None when the
    checkpoint was written by another number of ranks)."""
    path = Path(path)
    engine.load(path)
    trainer_state = json.loads((path / "trainer.json").read_text())
    if trainer_state.get("world_size", dist.get_world_size()) != dist.get_world_size():
        return trainer_state, None  # resumed on another world size: the per-rank states belong to other ranks
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(f"{rank_file}: missing (was the checkpoint written with another world size?)")
    return trainer_state, torch.load(rank_file, weights_only=True)
