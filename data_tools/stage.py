"""What every stage shares: input records, a resumable journal, accepted and rejected outputs, worker
processes, `--shard I/N`, a progress bar and a summary.

A stage is a function `record -> record` (or a list of records) that raises `Reject(reason)` for a
video that fails it. Outputs in DIR:
- `journal[.I-of-N].jsonl`: one line per input record as soon as it is done (what a re-run skips);
- `manifest[.I-of-N].jsonl`: accepted records, in input order, carrying forward every earlier field;
- `rejects[.I-of-N].jsonl`: `{"id", "path", "reason", "stage"}` per rejected record.
Manifests are written under a temporary name and renamed when complete; a record whose journal line
is not complete is simply done again. A crash inside a worker (a decoder can segfault on a bad file)
rejects that record and the run goes on.
"""

import concurrent.futures as cf
import contextlib
import csv
import json
import multiprocessing
import os
import re
import sys
from collections import Counter, deque
from pathlib import Path

from tqdm import tqdm

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"}


class Reject(Exception):
    """Raised by a stage for a video that fails it; the message is the recorded reason."""


def read_jsonl(path) -> list[dict]:
    """Records of a JSONL file; a malformed line is an error naming file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return records


def read_journal(path) -> list[dict]:
    """Records of an append-only JSONL journal (none when it does not exist); a line cut by a kill is not one."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def read_table(path) -> list[dict]:
    """Rows of a CSV (header row) or JSONL file, chosen by extension."""
    if Path(path).suffix == ".jsonl":
        return read_jsonl(path)
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def video_keys(name: str) -> tuple[str, str, str]:
    """The names a video is known by in side tables (captions, mappings): as given, its file name, its stem."""
    return name, Path(name).name, Path(name).stem


def find_video(table: dict, record: dict):
    """The entry of `table` for a record, by its id or its file's name or stem; None when absent."""
    keys = (record["id"], *video_keys(record["path"])[1:])
    return next((table[k] for k in keys if k in table), None)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same extension); renamed to `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path, records) -> None:
    """Write records atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _manifest_parts(directory: Path) -> list[Path]:
    whole = directory / "manifest.jsonl"
    if whole.exists():
        return [whole]
    parts = sorted(directory.glob("manifest.*-of-*.jsonl"))
    if parts:
        n = int(parts[0].name.split("-of-")[1].split(".")[0])
        missing = [i for i in range(n) if not (directory / f"manifest.{i}-of-{n}.jsonl").exists()]
        if missing:
            raise FileNotFoundError(f"{directory}: shards {missing} of {n} have no manifest yet (run them first)")
    return parts


def input_records(source) -> list[dict]:
    """Records from a JSONL manifest, a stage's output directory (its manifest, or all its shard parts), or a
    directory of videos (every file below it, hidden ones excepted: id = relative path without extension)."""
    source = Path(source)
    if source.is_file():
        return read_jsonl(source)
    if not source.is_dir():
        raise FileNotFoundError(f"--in {source}: no such file or directory")
    parts = _manifest_parts(source)
    if parts:
        return [r for p in parts for r in read_jsonl(p)]
    files = sorted(p for p in source.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))
    return [{"id": str(p.relative_to(source).with_suffix("")), "path": str(p.resolve())} for p in files]


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected I/N (for instance 0/4), found {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _apply(process, record) -> dict:
    """Run a stage on one record in a worker: {'accepted': [...]} or {'rejected': reason}."""
    try:
        out = process(record)
        return {"accepted": out if isinstance(out, list) else [out]}
    except Reject as e:
        return {"rejected": str(e)}
    except Exception as e:  # a bad file never stops a run
        return {"rejected": f"{type(e).__name__}: {e}"}


def _run_pool(process, todo, workers, on_done):
    """Every record through `process` in worker processes, at most `workers` in flight. When a worker dies,
    the records then in flight are retried one at a time, so the crash is pinned on its own file."""
    queue, suspects = deque(todo), deque()
    ctx = multiprocessing.get_context("spawn")
    while queue or suspects:
        source, width = (queue, workers) if queue else (suspects, 1)
        with cf.ProcessPoolExecutor(max_workers=width, mp_context=ctx) as pool:
            running = {}
            try:
                while source or running:
                    while source and len(running) < width:
                        record = source.popleft()
                        running[pool.submit(_apply, process, record)] = record
                    finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for future in finished:
                        result = future.result()
                        on_done(running.pop(future), result)
            except cf.process.BrokenProcessPool:
                if width == 1:
                    on_done(next(iter(running.values())), {"rejected": "the worker process died on this file"})
                else:
                    suspects.extend(running.values())


def run_stage(name: str, records: list[dict], process, out_dir, *, workers: int = 1, shard=(0, 1)) -> dict:
    """Run `process` over `records` (this shard's share), resumably; write manifest and rejects; return a summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = Counter(r.get("id") for r in records)
    dupes = [i for i, n in ids.items() if n > 1 or i is None]
    if dupes:
        raise ValueError(f"{name}: input records need unique 'id' fields; duplicated or missing: {dupes[:5]}")
    i, n = shard
    suffix = "" if n == 1 else f".{i}-of-{n}"
    mine = [r for k, r in enumerate(records) if k % n == i]
    journal_path = out / f"journal{suffix}.jsonl"
    done = {entry["id"]: entry for entry in read_journal(journal_path)}
    todo = [r for r in mine if r["id"] not in done]
    skipped = len(mine) - len(todo)
    bar = tqdm(total=len(todo), desc=name, unit="video", file=sys.stderr, disable=not todo)
    with open(journal_path, "a", encoding="utf-8") as journal:

        def on_done(record, result):
            entry = {"id": record["id"], **result}
            if "rejected" in result:
                entry["path"] = record.get("path")
            journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
            journal.flush()
            done[record["id"]] = entry
            bar.update()

        if todo:
            _run_pool(process, todo, workers, on_done)
    bar.close()
    accepted, rejects = [], []
    for r in mine:
        entry = done[r["id"]]
        if "rejected" in entry:
            rejects.append({"id": r["id"], "path": entry.get("path"), "reason": entry["rejected"], "stage": name})
        else:
            accepted.extend(entry["accepted"])
    write_jsonl(out / f"manifest{suffix}.jsonl", accepted)
    write_jsonl(out / f"rejects{suffix}.jsonl", rejects)
    summary = {"stage": name, "shard": f"{i}/{n}", "inputs": len(mine), "accepted": len(accepted),
               "rejected": len(rejects), "already_done": skipped}
    print(f"{name}: {len(mine)} inputs, {len(accepted)} accepted, {len(rejects)} rejected "
          f"({skipped} already done) -> {out}")
    kinds = Counter(re.sub(r"\d+(\.\d+)?", "#", r["reason"].split("; ")[0])[:80] for r in rejects)
    for reason, count in kinds.most_common(5):
        print(f"  rejected {count}: {reason}")
    return summary
