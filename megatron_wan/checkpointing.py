"""Checkpoint directories: `OUT/checkpoints/step_000300/`, written under a temporary name and renamed when every
rank has written its part, the newest K kept, `latest` pointing at the newest complete one.

A checkpoint holds the engine's files (trainable weights, optimizer), `trainer.json` (step, counters, config,
world size, the sampler's global position) and per rank `rank_R.pt` (RNG states), all loadable without pickle
(torch.load weights_only, JSON). Every rank must call `save` (it synchronizes).

Integrity, whatever files the engine writes: once every rank has written, each file of the directory is
fsynced and hashed (SHA-256; the ranks share the files out), `manifest.json` records every file's size and
hash, and only then is the directory renamed into place (directories fsynced around the rename). `latest`
checks the newest checkpoint against its manifest and, when it fails (a file missing, truncated, changed, or
no manifest), reports why and falls back to the previous one that passes.
"""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_wan.files import atomic_write, file_sha256, fsync, publish, remove, temporary

MANIFEST = "manifest.json"


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


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def staging(final: Path) -> Path:
    """The temporary name every rank writes checkpoint `final` under (one name for all ranks)."""
    return temporary(final, tag="ranks")


def _files(directory: Path) -> list[str]:
    """Every regular file under `directory` but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def _gathered(local) -> list:
    """Each rank's `local` result for its share of the work, gathered on every rank (in rank order)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [local]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def _my_share(items: list) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return items
    return items[dist.get_rank()::dist.get_world_size()]


def _seal(directory: Path) -> dict:
    """fsync and hash every file of `directory` (shared out over the ranks): {relative path: {bytes, sha256}}."""
    files = _files(directory)
    if dist.is_initialized() and dist.get_world_size() > 1:  # one listing, so that every rank shares out the same
        box = [files]
        dist.broadcast_object_list(box, src=0)
        files = box[0]
    local = {}
    for name in _my_share(files):
        fsync(directory / name)
        local[name] = {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
    return {k: v for part in _gathered(local) for k, v in part.items()}


def check(path) -> str | None:
    """Why checkpoint `path` fails its manifest (a file missing, of another size or hash; no manifest), or None.
    Under torch.distributed the ranks share the hashing out; every rank gets the same answer."""
    path = Path(path)
    problem, files = None, {}
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        problem = f"no {MANIFEST} (an interrupted save, or written before checkpoints had one)"
    except (ValueError, KeyError, TypeError) as e:
        problem = f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    local = None
    for name in _my_share(sorted(files)) if problem is None else ():
        want, file = files[name], path / name
        if not file.is_file():
            local = f"{name} missing"
        elif file.stat().st_size != want["bytes"]:
            local = f"{name} has {file.stat().st_size} bytes, its manifest says {want['bytes']}"
        elif file_sha256(file) != want["sha256"]:
            local = f"{name} does not match its SHA-256 in {MANIFEST} (changed on disk)"
        if local:
            break
    found = [p for p in _gathered(local) if p]
    return problem or (found[0] if found else None)


def latest(root, report=None) -> Path | None:
    """The newest checkpoint under `root` (OUT/checkpoints) that passes its checks, or None when there is none.

    A newer one that fails is reported through `report(message)` (default: stderr) and skipped; when every
    checkpoint fails, FileNotFoundError says why (resuming from nothing would lose the run)."""
    report = report or (lambda message: print(message, file=sys.stderr, flush=True))
    candidates = sorted((p for p in Path(root).glob("step_*") if p.is_dir()), reverse=True)
    failures = []
    for path in candidates:
        problem = check(path)
        if problem is None:
            return path
        failures.append(f"{path.name}: {problem}")
        report(f"checkpoint {path} fails its checks: {problem}; "
               f"{'trying the previous one' if path != candidates[-1] else 'no older one'}")
    if failures:
        raise FileNotFoundError(f"{root}: no checkpoint passes its checks ({'; '.join(failures)}); move them "
                                f"away or set run.resume=false to start over")
    return None


def latest_step(root) -> int:
    """The step of the newest complete checkpoint under `root` (OUT/checkpoints), 0 when there is none."""
    path = latest(root)
    return json.loads((path / "trainer.json").read_text())["step"] if path else 0


def save(root, step: int, engine, trainer_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` (every rank calls this); returns its path."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = staging(final)
    rank = dist.get_rank()
    if rank == 0:
        for killed in root.glob(".step_*.tmp-*"):  # what a save that was killed left (never read)
            remove(killed)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save(tmp)
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
    dist.barrier()
    files = _seal(tmp)  # every file on disk and hashed, before the directory becomes a checkpoint
    if rank == 0:
        _write_durably(tmp / MANIFEST, json.dumps({"files": files}, indent=1))
        for directory in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            fsync(directory)
        publish(tmp, final, durable=False)  # fsynced above, shared out over the ranks
        fsync(root)
        atomic_write(root / "latest", final.name)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
            shutil.rmtree(old)
        fsync(root)
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
