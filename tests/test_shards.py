"""The shard format: bit-exact round trip, atomic publication, and refusal of damaged files."""

import os
import re

import pytest
import torch

from megatron_wan.data.shards import ShardReader, ShardWriter, shard_paths
from megatron_wan.dtypes import SHARD_CODES


def raw(t):
    return t.reshape(-1).view(torch.uint8)


def assert_bit_exact(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(raw(got[name]), raw(want[name].contiguous())), name


def make_samples():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40, -3.5], dtype=torch.bfloat16)
    samples = {}
    for key, frames in (("clip-b", 2), ("clip-a", 3), ("clip-c", 1)):  # insertion order is not sorted order
        samples[key] = {
            "latent": torch.cat([special, torch.randn(16 * frames * 4 * 6 - 5, generator=g).bfloat16()])
            .reshape(16, frames, 4, 6),
            "text_emb": torch.randn(7 * frames, 32, generator=g).half(),
            "ids": torch.tensor([2**62 + frames, -1, 0]),
            "sigma": torch.tensor(0.25 * frames),  # 0-dim float32
            "mask": torch.rand(frames, 5, generator=g) > 0.5,
            "empty": torch.zeros(0, 4),
        }
    samples["clip-a"]["big"] = torch.randn(256, 1024, generator=g)  # 1 MiB
    samples["all-dtypes"] = {name: (torch.randn(3, 2, generator=g) * 100).to(dtype)
                             for name, dtype in SHARD_CODES.items()}
    samples["strided"] = {"t": torch.arange(24, dtype=torch.int32).reshape(4, 6).t()}  # non-contiguous input
    return samples


def write(prefix, samples, metadata=None):
    with ShardWriter(prefix, metadata=metadata) as w:
        for key, fields in samples.items():
            w.add(key, fields)


def test_round_trip_is_bit_exact(tmp_path):
    samples = make_samples()
    metadata = {"vae": "Wan2.1_VAE", "text_encoder": {"name": "umt5-xxl", "max_len": 512}}
    write(tmp_path / "s", samples, metadata)
    assert sorted(os.listdir(tmp_path)) == ["s.bin", "s.idx"]

    reader = ShardReader(tmp_path / "s")
    assert len(reader) == len(samples)
    assert reader.keys() == list(samples)
    assert reader.metadata == metadata
    assert "clip-a" in reader and "clip-z" not in reader
    for key, fields in samples.items():
        assert_bit_exact(reader[key], fields)
        assert_bit_exact(reader.get(key, copy=False), fields)
    assert reader.verify() == len(samples)


def test_getitem_returns_independent_copies(tmp_path):
    write(tmp_path / "s", {"a": {"x": torch.arange(6.0)}})
    reader = ShardReader(tmp_path / "s")
    reader["a"]["x"].fill_(-1)
    assert torch.equal(reader["a"]["x"], torch.arange(6.0))
    assert reader.verify() == 1


def test_unknown_key_names_key_and_shard(tmp_path):
    write(tmp_path / "s", {"a": {"x": torch.ones(1)}})
    with pytest.raises(KeyError, match=r"'nope'.*s\.idx"):
        ShardReader(tmp_path / "s")["nope"]


def test_unfinalized_shard_does_not_exist(tmp_path):
    w = ShardWriter(tmp_path / "s", metadata={"a": 1})
    w.add("a", {"x": torch.ones(3)})  # the process "dies" here: no finalize
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "s.idx"))):
        ShardReader(tmp_path / "s")
    w.abort()
    assert os.listdir(tmp_path) == []


def test_exception_inside_writer_context_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError, match="encoder failed"):
        with ShardWriter(tmp_path / "s") as w:
            w.add("a", {"x": torch.ones(3)})
            raise RuntimeError("encoder failed")
    assert os.listdir(tmp_path) == []


def test_rewriting_a_prefix_replaces_the_shard(tmp_path):
    write(tmp_path / "s", {"old": {"x": torch.ones(3)}})
    write(tmp_path / "s", {"new": {"x": torch.zeros(2)}})
    assert ShardReader(tmp_path / "s").keys() == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["s.bin", "s.idx"]


def test_truncated_bin_is_refused_with_file_and_sizes(tmp_path):
    write(tmp_path / "s", {"a": {"x": torch.ones(100)}})
    bin_path, _ = shard_paths(tmp_path / "s")
    size = os.path.getsize(bin_path)
    os.truncate(bin_path, size - 10)
    with pytest.raises(ValueError, match=rf"{re.escape(bin_path)}: truncated.*expects {size} bytes, found {size - 10}"):
        ShardReader(tmp_path / "s")


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"NOTANIDX" + b[8:], "not a shard index"),
    (lambda b: b[:8] + (99).to_bytes(4, "little") + b[12:], "unknown shard index version 99"),
    (lambda b: b[:-3], "header announces"),
])
def test_damaged_index_is_refused_with_file(tmp_path, damage, message):
    write(tmp_path / "s", {"a": {"x": torch.ones(3)}})
    _, idx_path = shard_paths(tmp_path / "s")
    with open(idx_path, "rb") as f:
        data = f.read()
    with open(idx_path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(ValueError, match=rf"{re.escape(idx_path)}: {message}"):
        ShardReader(tmp_path / "s")


def test_verify_names_the_corrupted_sample(tmp_path):
    samples = {k: {"x": torch.full((64,), float(i)), "y": torch.arange(i + 1)} for i, k in enumerate("abc")}
    write(tmp_path / "s", samples)
    assert ShardReader(tmp_path / "s").verify() == 3
    bin_path, _ = shard_paths(tmp_path / "s")
    with open(bin_path, "rb") as f:
        data = bytearray(f.read())
    at = data.find(raw(samples["b"]["x"]).numpy().tobytes()) + 17
    data[at] ^= 0x40
    with open(bin_path, "wb") as f:
        f.write(data)
    reader = ShardReader(tmp_path / "s")
    with pytest.raises(ValueError, match=rf"{re.escape(bin_path)}: sample 'b' is corrupted"):
        reader.verify()


def test_writer_rejects_duplicate_keys_and_non_tensors(tmp_path):
    with ShardWriter(tmp_path / "s") as w:
        w.add("a", {"x": torch.ones(1)})
        with pytest.raises(ValueError, match="duplicate sample key 'a'"):
            w.add("a", {"x": torch.ones(1)})
        with pytest.raises(TypeError, match=r"sample 'b' field 'y'.*torch.Tensor, found list"):
            w.add("b", {"x": torch.ones(1), "y": [1, 2]})
        with pytest.raises(TypeError, match=r"sample 'c' field 'z'.*complex64 not supported"):
            w.add("c", {"z": torch.ones(1, dtype=torch.complex64)})
    assert ShardReader(tmp_path / "s").keys() == ["a"]  # rejected samples left nothing behind
