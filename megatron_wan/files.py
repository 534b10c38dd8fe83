"""Files written whole or not at all, and their hashes: the one write-to-temporary-and-rename of the project.

A file (or folder) is written under a temporary name beside its final one, `.STEM.tmp-TAG.SUFFIX` (hidden, same
extension, so writers that pick a format by extension still work; TAG is the writing process's id unless given),
fsynced, then renamed over the final name and its directory fsynced. Readers only ever open final names, so a crash
mid-write leaves the old file (or none) and a temporary file that nothing reads; `stale_temporaries` finds those of
a path so that the next writer of that path removes them. Standard library only: the runtime and data_tools both
import it.
"""

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

TEMPORARY = re.compile(r"^\.(?P<stem>.+)\.tmp-(?P<tag>\w*)(?P<suffix>\.[^.]*)?$")  # temporary()'s names


def temporary(path, tag=None) -> Path:
    """The temporary name of `path`: `.STEM.tmp-TAG.SUFFIX` beside it (TAG: this process id by default; processes
    that write one folder together pass the same tag)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid() if tag is None else tag}{path.suffix}")


def target_name(name: str) -> str | None:
    """The final name a temporary name (see `temporary`) stands for; None for any other name."""
    m = TEMPORARY.match(name)
    return m and m["stem"] + (m["suffix"] or "")


def stale_temporaries(path) -> list[Path]:
    """The temporary files or folders of `path` that any process (a killed one) left beside it."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if target_name(p.name) == path.name)


def remove(path) -> None:
    """Remove a file or a folder tree, if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync(path) -> None:
    """Flush a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path) -> None:
    """fsync a file, or every file and folder of a tree (the folders after their entries)."""
    path = Path(path)
    if path.is_dir():
        for p in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):
            if not p.is_symlink():
                fsync(p)
    fsync(path)


def publish(tmp, path, *, durable: bool = True) -> None:
    """Rename the finished temporary `tmp` over `path` (a folder at `path` is removed first); with `durable`,
    `tmp` is fsynced before and the directory after, so that after a power cut `path` is old or new, never torn."""
    tmp, path = Path(tmp), Path(path)
    if durable:
        fsync_tree(tmp)
    if tmp.is_dir() and path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    if durable:
        fsync(path.parent)


@contextlib.contextmanager
def atomic_path(path, *, folder: bool = False, durable: bool = True, tag=None):
    """Yield the temporary path of `path` (an empty folder there with `folder`) for the block to write; it is
    published as `path` only if the block succeeds, and removed otherwise (an exception, a KeyboardInterrupt)."""
    path = Path(path)
    tmp = temporary(path, tag)
    remove(tmp)
    if folder:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        publish(tmp, path, durable=durable)
    finally:
        remove(tmp)


def atomic_write(path, data: str | bytes, *, durable: bool = True) -> None:
    """Write `data` (text as UTF-8) to `path` whole or not at all."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def file_sha256(path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
