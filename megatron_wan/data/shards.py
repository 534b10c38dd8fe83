"""Indexed binary shards: the one on-disk format for pre-encoded samples, its writer and its reader.

A shard is two files:

    PREFIX.bin  the raw bytes of every tensor, each starting at a multiple of 64 bytes (zero padding)
    PREFIX.idx  MAGIC (8 bytes), uint32 version, uint64 n, then n bytes of UTF-8 JSON (little-endian):
                {"metadata": {...}, "bin_size": int,
                 "samples": [{"key": str, "crc32": int,
                              "fields": {name: {"dtype": str, "shape": [int], "offset": int, "nbytes": int}}}]}

A sample's CRC32 (zlib) covers its fields' bytes in field order, padding excluded; `get(key, check=True)` checks
it as the sample is read (CorruptSample names shard and sample), `verify` checks every sample. The writer writes both
files under temporary names (megatron_wan.files), fsyncs them, then renames the .bin and, last, the .idx: a shard
exists exactly when its .idx does. Reading memory-maps the .bin; nothing is pickled.
"""

import errno
import json
import mmap
import os
import struct
import zlib
from collections.abc import Mapping

import torch

from megatron_wan.dtypes import SHARD_CODE, SHARD_CODES
from megatron_wan.files import publish, remove, stale_temporaries, temporary

MAGIC = b"MWANIDX\0"
VERSION = 1
ALIGN = 64
_HEAD = struct.Struct("<8sIQ")  # magic, version, JSON length


class CorruptSample(ValueError):
    """A sample whose bytes do not match its CRC32 (a flipped bit on disk); the message names shard and sample."""


def shard_paths(prefix) -> tuple[str, str]:
    """The (.bin, .idx) paths of the shard at `prefix`."""
    prefix = os.fspath(prefix)
    return prefix + ".bin", prefix + ".idx"


class ShardWriter:
    """Writes one shard: `add` samples, then `finalize` publishes it.

    As a context manager it finalizes on a clean exit and removes its partial files on an exception.
    Writing to the prefix of an existing shard replaces it: the old .idx is removed before the new
    .bin is renamed into place, so the old shard disappears before the new one appears.
    """

    def __init__(self, prefix, metadata=None):
        self.bin_path, self.idx_path = shard_paths(prefix)
        self.metadata = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{self.idx_path}: metadata must be JSON-serializable: {e}") from e
        self._tmp = {path: temporary(path) for path in (self.bin_path, self.idx_path)}
        for path in self._tmp:  # a killed writer's
            for stale in stale_temporaries(path):
                remove(stale)
        self._bin = open(self._tmp[self.bin_path], "wb")
        self._samples: list[dict] = []
        self._keys: set[str] = set()
        self._size = 0
        self._closed = False

    def add(self, key: str, fields: Mapping[str, torch.Tensor]):
        """Append one sample: a unique string key and {field name: tensor} (any dtype in SHARD_CODES, any shape)."""
        if self._closed:
            raise RuntimeError(f"{self.idx_path}: writer is already finalized or aborted")
        if not isinstance(key, str):
            raise TypeError(f"{self.idx_path}: sample keys must be str, found {type(key).__name__} {key!r}")
        if key in self._keys:
            raise ValueError(f"{self.idx_path}: duplicate sample key {key!r}")
        if not isinstance(fields, Mapping) or not fields:
            raise TypeError(f"{self.idx_path}: sample {key!r}: expected a non-empty dict of tensors, found {fields!r}")
        tensors = {}  # all fields are checked before any byte is written
        for name, t in fields.items():
            where = f"{self.idx_path}: sample {key!r} field {name!r}"
            if not isinstance(name, str):
                raise TypeError(f"{where}: field names must be str")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: expected a torch.Tensor, found {type(t).__name__}")
            if t.dtype not in SHARD_CODE:
                raise TypeError(f"{where}: dtype {t.dtype} not supported (supported: {', '.join(SHARD_CODES)})")
            tensors[name] = t.detach().cpu().contiguous()
        crc, entries = 0, {}
        for name, t in tensors.items():
            raw = t.reshape(-1).view(torch.uint8).numpy()
            pad = -self._size % ALIGN
            self._bin.write(bytes(pad))
            self._size += pad
            self._bin.write(raw)
            entries[name] = {"dtype": SHARD_CODE[t.dtype], "shape": list(t.shape), "offset": self._size,
                             "nbytes": raw.nbytes}
            crc = zlib.crc32(raw, crc)
            self._size += raw.nbytes
        self._samples.append({"key": key, "crc32": crc, "fields": entries})
        self._keys.add(key)

    def finalize(self):
        """Flush, fsync and publish the shard (.bin, then .idx); on failure, remove the partial files."""
        if self._closed:
            raise RuntimeError(f"{self.idx_path}: writer is already finalized or aborted")
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            index = {"metadata": self.metadata, "bin_size": self._size, "samples": self._samples}
            payload = json.dumps(index, separators=(",", ":")).encode()
            with open(self._tmp[self.idx_path], "wb") as f:
                f.write(_HEAD.pack(MAGIC, VERSION, len(payload)))
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(self.idx_path):
                os.remove(self.idx_path)
            publish(self._tmp[self.bin_path], self.bin_path, durable=False)  # both fsynced above
            publish(self._tmp[self.idx_path], self.idx_path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self):
        """Close and remove the temporary files; a finalized shard is left alone."""
        if self._closed:
            return
        self._closed = True
        self._bin.close()
        for tmp in self._tmp.values():
            remove(tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if not self._closed:
                self.finalize()
        else:
            self.abort()
        return False


class ShardReader:
    """Random access to one finalized shard; the .bin is memory-mapped, nothing is unpickled.

    `reader[key]` returns independent, writable copies. `reader.get(key, copy=False)` returns zero-copy
    views of a private (copy-on-write) mapping: cheapest, e.g. to collate straight into a batch, but a
    write to them is seen by later views from the same reader (never by the file): treat them as read-only.
    """

    def __init__(self, prefix):
        self.bin_path, self.idx_path = shard_paths(prefix)
        if not os.path.exists(self.idx_path):
            raise FileNotFoundError(errno.ENOENT, "no shard index (a shard exists once its .idx does)", self.idx_path)
        with open(self.idx_path, "rb") as f:
            data = f.read()
        if len(data) < _HEAD.size or data[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{self.idx_path}: not a shard index (expected magic {MAGIC!r} and a "
                             f"{_HEAD.size}-byte header, found {data[:_HEAD.size]!r})")
        _, version, length = _HEAD.unpack_from(data)
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: unknown shard index version {version} (this reader knows {VERSION})")
        if len(data) != _HEAD.size + length:
            raise ValueError(f"{self.idx_path}: header announces {length} index bytes, found {len(data) - _HEAD.size}")
        try:
            index = json.loads(data[_HEAD.size:])
            self.metadata: dict = index["metadata"]
            bin_size = index["bin_size"]
            self._samples = {
                s["key"]: (s["crc32"], [(name, SHARD_CODES[f["dtype"]], tuple(f["shape"]), f["offset"], f["nbytes"])
                                        for name, f in s["fields"].items()])
                for s in index["samples"]}
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.idx_path}: malformed index ({type(e).__name__}: {e})") from e
        with open(self.bin_path, "rb") as f:
            found = os.fstat(f.fileno()).st_size
            if found != bin_size:
                state = "truncated" if found < bin_size else "larger than indexed"
                raise ValueError(f"{self.bin_path}: {state}: {self.idx_path} expects {bin_size} bytes, found {found}")
            self._buf = mmap.mmap(f.fileno(), bin_size, access=mmap.ACCESS_COPY) if bin_size else bytearray()

    def __len__(self) -> int:
        return len(self._samples)

    def __contains__(self, key) -> bool:
        return key in self._samples

    def keys(self) -> list[str]:
        """Sample keys in the order they were added."""
        return list(self._samples)

    def spec(self, key: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """{field: (dtype, shape)} of one sample, from the index alone (no data is read)."""
        try:
            _, fields = self._samples[key]
        except KeyError:
            raise KeyError(f"sample {key!r} not in shard {self.idx_path}") from None
        return {name: (dtype, shape) for name, dtype, shape, *_ in fields}

    def _check(self, key: str, crc: int, fields) -> None:
        view, found = memoryview(self._buf), 0
        for *_, offset, nbytes in fields:
            found = zlib.crc32(view[offset:offset + nbytes], found)
        if found != crc:
            raise CorruptSample(f"{self.bin_path}: sample {key!r} is corrupted "
                                f"(CRC32 expected {crc:08x}, found {found:08x})")

    def get(self, key: str, *, copy: bool = True, check: bool = False) -> dict[str, torch.Tensor]:
        """{field: tensor} of one sample, bit-exact; copies, or mmap-backed views with copy=False (see class).
        `check`: first recompute its CRC32, raising CorruptSample on a mismatch."""
        try:
            crc, fields = self._samples[key]
        except KeyError:
            raise KeyError(f"sample {key!r} not in shard {self.idx_path}") from None
        if check:
            self._check(key, crc, fields)
        out = {}
        for name, dtype, shape, offset, nbytes in fields:
            if nbytes == 0:
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            t = torch.frombuffer(self._buf, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).reshape(shape)
            out[name] = t.clone() if copy else t
        return out

    def __getitem__(self, key: str) -> dict[str, torch.Tensor]:
        return self.get(key)

    def verify(self) -> int:
        """Recompute every sample's CRC32; raise CorruptSample (a ValueError) naming the first corrupted sample,
        else return the count."""
        for key, (crc, fields) in self._samples.items():
            self._check(key, crc, fields)
        return len(self._samples)
