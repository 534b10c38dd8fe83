"""PairDataset: preference pairs read from an encoded dataset directory (`python -m data_tools encode`).

An item is {"id", "winner_latent", "loser_latent", "text_emb" (zero-padded to `text_len`, as WanPipeline pads),
"text_len"} plus, for I2V, the pair's shared "clip_emb" and "cond_latent" (stored with the winner). Shards are
memory-mapped lazily in each process (DataLoader workers included); nothing is unpickled.

Every sample's CRC32 is checked as it is read. A corrupted one aborts (`on_corrupt="abort"`: CorruptSample names
shard and sample), or (`"skip"`) is reported on stderr and its pair replaced by the next clean pair of the same
latent shape; the item's "corrupt_skipped" counts the pairs skipped to produce it.
"""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from megatron_wan.data.shards import CorruptSample, ShardReader
from megatron_wan.models import task
from megatron_wan.models.wan21.conditioner import TEXT_LEN, pad_text


def _read_pairs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class PairDataset(Dataset):
    """`pairs` (a JSONL of pairs; default DIR/train.jsonl) over the shards of `directory`."""

    def __init__(self, directory, pairs=None, text_len: int = TEXT_LEN, on_corrupt: str = "abort"):
        if on_corrupt not in ("abort", "skip"):
            raise ValueError(f"on_corrupt: expected 'abort' or 'skip', found {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self._corrupt: set[int] = set()  # pairs found corrupted by this process
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path}: no dataset manifest (run `python -m data_tools encode`)")
        self.manifest = json.loads(manifest_path.read_text())
        self.task = self.manifest["encoder"]["task"]
        self.text_len = text_len
        self.pairs_path = Path(pairs) if pairs else self.directory / "train.jsonl"
        self.pairs = _read_pairs(self.pairs_path)
        self._prefixes = [str(self.directory / s["prefix"]) for s in self.manifest["shards"]]
        self._readers: dict[int, ShardReader] = {}
        self._where, latent = {}, {}
        for n in range(len(self._prefixes)):
            reader = self._reader(n)
            for key in reader.keys():
                self._where[key] = n
                latent[key] = reader.spec(key)["latent"][1]
        self._shapes = []
        for pair in self.pairs:
            keys = [pair[side]["id"] for side in ("winner", "loser")]
            for side, key in zip(("winner", "loser"), keys):
                if key not in self._where:
                    raise KeyError(f"{self.pairs_path}: pair {pair['id']!r} {side} {key!r} is in no shard of "
                                   f"{self.directory}")
            if latent[keys[0]] != latent[keys[1]]:
                raise ValueError(f"{self.pairs_path}: pair {pair['id']!r}: winner latent {latent[keys[0]]} and "
                                 f"loser latent {latent[keys[1]]} differ")
            self._shapes.append(latent[keys[0]])

    def _reader(self, n: int) -> ShardReader:
        if n not in self._readers:
            self._readers[n] = ShardReader(self._prefixes[n])
        return self._readers[n]

    def __getstate__(self):  # DataLoader workers open their own maps
        return {**self.__dict__, "_readers": {}}

    def _sample(self, key: str) -> dict[str, torch.Tensor]:
        return self._reader(self._where[key]).get(key, check=True)

    @property
    def shapes(self) -> list[tuple]:
        """The latent shape of every pair, in order: what BucketBatchSampler groups by."""
        return list(self._shapes)

    def __len__(self) -> int:
        return len(self.pairs)

    def _read_pair(self, i: int) -> tuple[int, dict, dict]:
        """(j, winner, loser samples of pair j): j = i, or with on_corrupt="skip" the next clean pair of i's shape."""
        n = len(self.pairs)
        for j in (i, *((i + d) % n for d in range(1, n))):
            if j in self._corrupt or self._shapes[j] != self._shapes[i]:
                continue
            pair = self.pairs[j]
            try:
                return j, self._sample(pair["winner"]["id"]), self._sample(pair["loser"]["id"])
            except CorruptSample as e:
                if self.on_corrupt == "abort":
                    raise CorruptSample(f"{e}; pair {pair['id']!r} of {self.pairs_path} (data.on_corrupt=abort; "
                                        f"'skip' skips and counts such pairs)") from None
                self._corrupt.add(j)
                print(f"data: {e}: pair {pair['id']!r} skipped (data.on_corrupt=skip)", file=sys.stderr, flush=True)
        raise CorruptSample(f"{self.pairs_path}: pair {self.pairs[i]['id']!r} is corrupted and so is every other "
                            f"pair of latent shape {list(self._shapes[i])}")

    def __getitem__(self, i: int) -> dict:
        before = len(self._corrupt)
        j, win, lose = self._read_pair(i)
        item = {"id": self.pairs[j]["id"], "winner_latent": win["latent"], "loser_latent": lose["latent"],
                "text_emb": pad_text(win["text_emb"], self.text_len), "text_len": win["text_emb"].shape[0],
                "corrupt_skipped": len(self._corrupt) - before}
        if task(self.task).image:  # the pair's shared image conditioning, stored with the winner
            item["clip_emb"], item["cond_latent"] = win["clip_emb"], win["cond_latent"]
        return item
