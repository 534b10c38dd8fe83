"""What every stage shares: input records, a resumable journal, accepted and rejected outputs, worker
processes, `--shard I/N`, a progress bar and a summary.

A stage is a function `record -> record` (or a list of records) that raises `Reject(reason)` for a
video that fails it; `run_stage` runs it in worker processes, or, for a stage that runs a model (generate,
encode), in this process, with per-record parts (generate's K videos of a GT), decoding ahead in threads and a
sink other than the manifest (encode's shards). Outputs in DIR:
- `journal[.I-of-N].jsonl`: one line per input record as soon as it is done (what a re-run skips);
- `manifest[.I-of-N].jsonl`: accepted records, in input order, carrying forward every earlier field;
- `rejects[.I-of-N].jsonl`: `{"id", "path", "reason", "stage"}` per rejected record.
Manifests are written under a temporary name and renamed when complete (megatron_wan.files); a record whose journal line
is not complete is simply done again (a torn last line is truncated). A crash inside a worker (a decoder
can segfault on a bad file) rejects that record and the run goes on; workers die with the stage's process
(even under kill -9), and the next run removes the temporary files a killed one left.
"""

import concurrent.futures as cf
import csv
import ctypes
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

from tqdm import tqdm

from megatron_wan.files import TEMPORARY, atomic_path


class Reject(Exception):
    """Raised by a stage for a video that fails it; the message is the recorded reason."""


def read_jsonl(path) -> list[dict]:
    """Records of a JSONL file (a UTF-8 BOM is read); a malformed line is an error naming file and line."""
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return records


def read_journal(path, repair: bool = False) -> list[dict]:
    """Records of an append-only JSONL journal (none when it does not exist). A line cut by a kill or a full disk
    (no newline, or not JSON) is not one: the record is done again; with `repair`, a torn tail is truncated so
    the next line appended starts on a line of its own."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    whole = data[:data.rfind(b"\n") + 1]
    if repair and len(whole) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
        print(f"{path}: ignored a torn last line ({len(data) - len(whole)} bytes, truncated)", file=sys.stderr)
    records = []
    for n, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if line.strip():
                print(f"{path}:{n}: not a complete journal line, ignored (its record is done again)",
                      file=sys.stderr)
    return records


def read_table(path) -> list[dict]:
    """Rows of a CSV (header row) or JSONL file, chosen by extension; a UTF-8 BOM (as Excel writes) is read."""
    if Path(path).suffix == ".jsonl":
        return read_jsonl(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _key(name: str) -> str:
    return str(name).strip().replace("\\", "/").removeprefix("./")


def record_keys(record: dict) -> list[str]:
    """The names a record is known by in side tables, most specific first: its id, then its file's path and every
    shorter tail of it down to the file name, each with and without the extension (`/raw/dirA/clip.mp4`,
    `raw/dirA/clip.mp4`, `raw/dirA/clip`, ..., `clip.mp4`, `clip`)."""
    path = Path(record["path"])
    parts = path.with_suffix("").parts
    keys = [record["id"], str(path)]
    for k in range(len(parts), 0, -1):
        tail = "/".join(parts[-k:]).lstrip("/")
        keys += [tail + path.suffix, tail]
    return list(dict.fromkeys(_key(k) for k in keys))


class VideoTable:
    """A side table keyed by video (captions, a mapping): `rows` are (row number, key as written, value). A
    record gets the row of its most specific key (`record_keys`), so `dirA/clip.mp4` and `dirB/clip.mp4` are
    told apart; one key on rows with different values is refused, naming the rows."""

    def __init__(self, path, rows):
        self.path, self.rows = path, {}
        for n, key, value in rows:
            self.rows.setdefault(_key(key), []).append((n, value))
        clashes = [f"{k!r} (rows {', '.join(str(n) for n, _ in found)})" for k, found in self.rows.items()
                   if len({json.dumps(v, sort_keys=True, default=str) for _, v in found}) > 1]
        if clashes:
            raise ValueError(f"{path}: ambiguous: one video named on rows with different values: "
                             f"{'; '.join(clashes[:5])}")

    def find(self, record: dict):
        """(row number, value) of the record's row; None when no row names it."""
        return next((self.rows[k][0] for k in record_keys(record) if k in self.rows), None)


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


def read_inputs(source) -> tuple[list[dict], list[dict]]:
    """(records, rejects) of `--in`: a JSONL manifest, a stage's output directory (its manifest, or all its shard
    parts), or a directory of videos: every entry below it except hidden ones (a name starting with '.', below
    the directory itself), id = relative path without extension. A dangling link, an entry that is not a file,
    and a file whose id an earlier one has (`a.mp4`, `a.mov`) are rejects `{id, path, reason}`."""
    source = Path(source)
    if source.is_file():
        return read_jsonl(source), []
    if not source.is_dir():
        raise FileNotFoundError(f"--in {source}: no such file or directory")
    parts = _manifest_parts(source)
    if parts:
        return [r for p in parts for r in read_jsonl(p)], []
    records, rejects, seen = [], [], {}
    for p in sorted(source.rglob("*")):
        rel = p.relative_to(source)
        if any(s.startswith(".") for s in rel.parts) or (p.is_dir() and not p.is_symlink()):
            continue
        entry = {"id": str(rel.with_suffix("")), "path": str(p.absolute())}
        if p.is_symlink() and not p.exists():
            rejects.append({**entry, "id": str(rel), "reason": f"dangling symbolic link to {os.readlink(p)}"})
        elif p.is_dir():
            rejects.append({**entry, "id": str(rel), "reason": "symbolic link to a folder (not followed)"})
        elif not p.is_file():
            rejects.append({**entry, "id": str(rel), "reason": "not a regular file"})
        elif entry["id"] in seen:
            rejects.append({**entry, "id": str(rel), "reason": f"same id {entry['id']!r} as {seen[entry['id']]} "
                            "(ids are relative paths without extension): rename one"})
        else:
            seen[entry["id"]] = str(rel)
            records.append({**entry, "path": str(p.resolve())})
    return records, rejects


def input_records(source) -> list[dict]:
    """The records of `--in` (see read_inputs); the rejected entries of a directory are named on stderr."""
    records, rejects = read_inputs(source)
    for r in rejects:
        print(f"{source}: skipped {r['path']}: {r['reason']}", file=sys.stderr)
    return records


def no_inputs(source) -> str:
    """Why `--in` gave no records, for the error message."""
    rejects = Path(source) / "rejects.jsonl"
    if rejects.exists():
        found = read_journal(rejects)
        return (f"{source}: no inputs: its manifest is empty ({len(found)} rejected by the stage that wrote it, "
                f"see {rejects})")
    return f"{source}: no inputs (no video files, or an empty manifest)"


def add_device_arguments(parser) -> None:
    """--device and --no-offload, shared by the stages that run models."""
    import torch  # not at the top: worker processes import this module

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-offload", dest="offload", action="store_false",
                        help="keep every encoder on the device (default: each visits it only while it runs)")


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
        from data_tools.media import clean_reason

        return {"rejected": f"{type(e).__name__}: {clean_reason(e)}"}


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """Worker initializer: the worker is killed when the stage's process dies, even by SIGKILL (Linux:
    PR_SET_PDEATHSIG; elsewhere a thread that watches the parent)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _run_pool(process, todo, workers, on_done):
    """Every record through `process` in worker processes, at most `workers` in flight. When a worker dies,
    the records then in flight are retried one at a time, so the crash is pinned on its own file."""
    queue, suspects = deque(todo), deque()
    ctx = multiprocessing.get_context("spawn")
    while queue or suspects:
        source, width = (queue, workers) if queue else (suspects, 1)
        with cf.ProcessPoolExecutor(max_workers=width, mp_context=ctx, initializer=die_with_parent,
                                    initargs=(os.getpid(),)) as pool:
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


def remove_leftovers(out: Path, ids, suffix: str) -> int:
    """Remove the temporary files a killed run left in `out`: those of the records `ids` (not journaled, so no
    other shard writes them) and of this shard's manifest and rejects; returns how many."""
    ids, mine, removed = set(ids), {f"manifest{suffix}", f"rejects{suffix}"}, 0
    for tmp in out.rglob(".*.tmp-*"):
        m = TEMPORARY.match(tmp.name)
        rel = tmp.parent.relative_to(out).parts
        if m and (m["stem"] in mine if not rel else "/".join((*rel[1:], m["stem"])) in ids):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _grouped(rejects: list[dict]) -> list[tuple[int, dict]]:
    """Rejects grouped by the words of their first reason (numbers aside): (count, a real example), most first."""
    groups = {}
    for r in rejects:
        groups.setdefault(re.sub(r"\d+(\.\d+)?", "#", r["reason"].split("; ")[0].split(" | ")[0]), []).append(r)
    return sorted(((len(g), g[0]) for g in groups.values()), key=lambda x: -x[0])


def shard_suffix(shard) -> str:
    """The file-name suffix of `--shard I/N`: '' for one shard, '.I-of-N' of N."""
    i, n = shard
    return "" if n == 1 else f".{i}-of-{n}"


def shard_share(records: list, shard) -> list:
    """The records `--shard I/N` processes: every N-th, starting at I."""
    i, n = shard
    return [r for k, r in enumerate(records) if k % n == i]


def _one_part(record) -> list[str]:
    return [record["id"]]


def _outputs(entry) -> list[dict]:
    out = entry["accepted"]
    return out if isinstance(out, list) else [out]  # generate's journals before the shared runner held one record


def _run_here(process, todo, on_done, *, parts: bool, prefetch, threads: int):
    """Every (record, pending part ids) of `todo` through `process` in this process, in order; `prefetch` runs in
    `threads` threads ahead. Reject rejects a record (or a part); any other error stops the run."""
    with cf.ThreadPoolExecutor(max(1, threads)) as pool:
        ahead = deque()
        for k, (record, ids) in enumerate(todo):
            while prefetch and len(ahead) < threads + 1 and k + len(ahead) < len(todo):
                ahead.append(pool.submit(prefetch, todo[k + len(ahead)][0]))
            try:
                if not parts:
                    out = process(record, ahead.popleft().result()) if prefetch else process(record)
                    on_done(record["id"], record, {"accepted": out if isinstance(out, list) else [out]})
                    continue
                work = process(record, ids)
            except Reject as e:
                on_done(record["id"], record, {"rejected": str(e)}, len(ids))
                continue
            for part, make in work:
                try:
                    out = make()
                    on_done(part, record, {"accepted": out if isinstance(out, list) else [out]})
                except Reject as e:
                    on_done(part, record, {"rejected": str(e)})


def run_stage(name: str, records: list[dict], process, out_dir, *, workers: int = 1, shard=(0, 1),
              rejected_inputs=(), in_process: bool = False, parts=None, prefetch=None, sink=None,
              suffix: str | None = None) -> dict:
    """Run `process` over `records` (this shard's share), resumably; write manifest and rejects; return a summary.
    `rejected_inputs` (read_inputs' rejects: {id, path, reason}) are journaled as rejects without a worker.

    By default each record goes through `process(record)` in one of `workers` processes and any error rejects it.
    With `in_process`, records go through `process` here, in order (a model loaded once), and only Reject rejects
    (any other error, e.g. out of memory, stops the run); then, for stages that run a model per record:
    - `prefetch(record)` runs in `workers` threads ahead (decoding the next videos) and its result is the second
      argument of `process(record, prefetched)`; a Reject from either rejects the record;
    - `parts(record)` names a record's parts, each journaled on its own (generate: K videos of a GT):
      `process(record, ids)` gets the part ids not done yet and returns [(id, make)], `make()` giving that part's
      output; a Reject from `process` rejects the record as a whole, one from `make()` that part only;
    - a `sink` takes the accepted outputs instead of the manifest (encode: shards): `sink.done` holds the ids it has
      published (a re-run skips them), `sink.add(id, output)` takes one, `sink.close()` publishes the rest; the
      journal then holds the rejects only.
    `suffix` names this shard's files (default: shard_suffix)."""
    if not in_process and (parts or prefetch or sink) or (parts and prefetch):
        raise ValueError(f"{name}: parts, prefetch and sink are for stages that run in this process (in_process), "
                         "parts and prefetch not together")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    everything = [*records, *({**r, "input_reject": r["reason"]} for r in rejected_inputs)]
    ids = Counter(r.get("id") for r in everything)
    dupes = [i for i, n in ids.items() if n > 1 or i is None]
    if dupes:
        raise ValueError(f"{name}: input records need unique 'id' fields; duplicated or missing: {dupes[:5]}")
    suffix = shard_suffix(shard) if suffix is None else suffix
    parts_of = parts or _one_part
    mine = shard_share(everything, shard)
    journal_path = out / f"journal{suffix}.jsonl"
    done = {entry["id"]: entry for entry in read_journal(journal_path, repair=True)}
    published = sink.done if sink is not None else set()
    pending = {r["id"]: [p for p in parts_of(r) if p not in done and p not in published]
               for r in mine if r["id"] not in done}
    todo = [(r, pending[r["id"]]) for r in mine if pending.get(r["id"])]
    skipped = sum(p in done or p in published for r in mine for p in parts_of(r))
    removed = remove_leftovers(out, (p for _, ids in todo for p in ids), suffix)
    if removed:
        print(f"{name}: removed {removed} temporary files of an earlier run that was killed", file=sys.stderr)
    bar = tqdm(total=sum(len(ids) for _, ids in todo), desc=name, unit="video", file=sys.stderr, disable=not todo)
    with open(journal_path, "a", encoding="utf-8") as journal:

        def on_done(key, record, result, count=1):
            entry = {"id": key, **result}
            if "rejected" in result:
                entry["path"] = record.get("path")
            elif sink is not None:  # published by the sink, not journaled
                sink.add(key, result["accepted"][0])
                bar.update(count)
                return
            journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
            journal.flush()
            done[key] = entry
            bar.update(count)

        for r, _ in todo:
            if "input_reject" in r:
                on_done(r["id"], r, {"rejected": r["input_reject"], "stage": "input"})
        work = [(r, ids) for r, ids in todo if "input_reject" not in r]
        if in_process:
            _run_here(process, work, on_done, parts=parts is not None, prefetch=prefetch, threads=workers)
            if sink is not None:
                sink.close()  # not after an error: a killed writer's temporary files are removed by the next
        elif work:
            _run_pool(process, [r for r, _ in work], workers, lambda record, result: on_done(record["id"], record,
                                                                                             result))
    bar.close()
    accepted, rejects = [], []
    for r in mine:
        for key in dict.fromkeys((r["id"], *parts_of(r))):
            entry = done.get(key)
            if entry is None:
                continue
            if "rejected" in entry:
                rejects.append({"id": key, "path": entry.get("path"), "reason": entry["rejected"],
                                "stage": entry.get("stage", name)})
            else:
                accepted.extend(_outputs(entry))
    if sink is None:
        write_jsonl(out / f"manifest{suffix}.jsonl", accepted)
    write_jsonl(out / f"rejects{suffix}.jsonl", rejects)
    count = len(accepted) if sink is None else sum(p in sink.done for r in mine for p in parts_of(r))
    summary = {"stage": name, "shard": f"{shard[0]}/{shard[1]}", "inputs": len(mine), "accepted": count,
               "rejected": len(rejects), "already_done": skipped}
    print(f"{name}: {len(mine)} inputs, {count} accepted, {len(rejects)} rejected ({skipped} already done) -> {out}")
    for n, example in _grouped(rejects)[:5]:
        reason = example["reason"] if len(example["reason"]) <= 160 else example["reason"][:160].rsplit(" ", 1)[0]
        print(f"  rejected {n}" + (f", e.g. {example['id']}: " if n > 1 else f": {example['id']}: ")
              + reason + ("" if reason == example["reason"] else " ..."))
    return summary
