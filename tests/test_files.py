"""megatron_wan.files: a file or folder is published whole or not at all. A crash mid-write (an exception, or the
writing process killed by SIGKILL) leaves the old file (or none), and the temporary file it leaves is neither read
nor kept by the next writer. Also: shards written before the shared dtype table still read, byte for byte."""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.stage import read_inputs, remove_leftovers
from megatron_wan.data.shards import ShardReader, ShardWriter
from megatron_wan.dtypes import SHARD_CODES
from megatron_wan.files import atomic_path, atomic_write, file_sha256, stale_temporaries, target_name, temporary

REPO = Path(__file__).parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "shard_v1" / "all-dtypes"


def _killed_while_writing(code: str) -> None:
    """Run `code` (which prints 'ready' once it has written half of its file) in a child and SIGKILL it there."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.json"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["table.json"]
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "new.json") as tmp:
        tmp.write_text("{")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["table.json"]  # no new file at all
    atomic_write(path, b"new")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["table.json"]


def test_a_folder_is_replaced_whole_or_kept(tmp_path):
    final = tmp_path / "transformer"
    with atomic_path(final, folder=True) as tmp:
        (tmp / "config.json").write_text("1")
    with pytest.raises(OSError), atomic_path(final, folder=True) as tmp:
        (tmp / "config.json").write_text("2")
        (tmp / "weights").write_text("half")
        raise OSError("killed by the writer")
    assert sorted(os.listdir(tmp_path)) == ["transformer"] and os.listdir(final) == ["config.json"]
    assert (final / "config.json").read_text() == "1"
    with atomic_path(final, folder=True) as tmp:
        (tmp / "weights").write_text("2")
    assert os.listdir(final) == ["weights"] and sorted(os.listdir(tmp_path)) == ["transformer"]


def test_temporary_names_are_hidden_and_keep_the_extension(tmp_path):
    tmp = temporary(tmp_path / "videos" / "clip.a.mp4", tag=7)
    assert tmp == tmp_path / "videos" / ".clip.a.tmp-7.mp4"
    assert target_name(tmp.name) == "clip.a.mp4" and target_name("clip.a.mp4") is None
    assert target_name(temporary(tmp_path / "latest").name) == "latest"


def test_a_killed_writer_leaves_the_old_file_and_its_litter_is_never_read(tmp_path):
    videos = tmp_path / "stage" / "videos"
    videos.mkdir(parents=True)
    path = videos / "clip.mp4"
    path.write_bytes(b"the old video")
    _killed_while_writing(
        "import sys, time\nfrom megatron_wan.files import atomic_path\n"
        f"with atomic_path({str(path)!r}) as tmp:\n"
        "    tmp.write_bytes(b'half a vid')\n    print('ready', flush=True)\n    time.sleep(60)\n")
    assert path.read_bytes() == b"the old video"
    (litter,) = stale_temporaries(path)
    assert litter.name.startswith(".clip.tmp-") and litter.read_bytes() == b"half a vid"
    records, rejects = read_inputs(tmp_path / "stage")  # a folder of videos as input: the litter is not one
    assert [r["id"] for r in records] == ["videos/clip"] and not rejects
    assert remove_leftovers(tmp_path / "stage", ["clip"], "") == 1 and not stale_temporaries(path)


def test_a_killed_shard_writer_leaves_the_old_shard_readable(tmp_path):
    prefix = tmp_path / "part-0"
    with ShardWriter(prefix, {"v": 1}) as w:
        w.add("a", {"x": torch.arange(4.0)})
    _killed_while_writing(
        "import time, torch\nfrom megatron_wan.data.shards import ShardWriter\n"
        f"w = ShardWriter({str(prefix)!r}, {{'v': 2}})\n"
        "w.add('b', {'x': torch.ones(1000)})\nw._bin.flush()\nprint('ready', flush=True)\ntime.sleep(60)\n")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 3 and left[1:] == ["part-0.bin", "part-0.idx"] and target_name(left[0]) == "part-0.bin"
    reader = ShardReader(prefix)
    assert reader.metadata == {"v": 1} and torch.equal(reader["a"]["x"], torch.arange(4.0))
    with ShardWriter(prefix, {"v": 3}) as w:  # the next writer of the prefix removes what the killed one left
        w.add("c", {"x": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-0.bin", "part-0.idx"]
    assert ShardReader(prefix).keys() == ["c"]


def _fixture_samples() -> dict:
    g = torch.Generator().manual_seed(0)  # as the fixture was written (tests/fixtures/shard_v1, from 1e5da56)
    samples = {code: {"x": (torch.randn(2, 3, generator=g) * 100).to(dtype)} for code, dtype in SHARD_CODES.items()}
    samples["two-fields"] = {"a": torch.arange(5, dtype=torch.int64), "b": torch.ones(1, 2, dtype=torch.bfloat16)}
    return samples


def test_shards_written_before_the_dtype_table_read_and_are_written_the_same(tmp_path):
    reader, samples = ShardReader(FIXTURE), _fixture_samples()
    assert reader.keys() == list(samples) and reader.verify() == len(samples)
    for key, fields in samples.items():
        got = reader[key]
        assert all(got[f].dtype == t.dtype and torch.equal(got[f], t) for f, t in fields.items()), key
    with ShardWriter(tmp_path / "all-dtypes", {"written_by": "megatron_wan 1e5da56"}) as w:
        for key, fields in samples.items():
            w.add(key, fields)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"all-dtypes.{ext}").read_bytes() == Path(f"{FIXTURE}.{ext}").read_bytes()


def test_file_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(3 * 2**20 + 123)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
