"""PairDataset: preference pairs read from an encoded dataset directory (`python -m data_tools encode`).

An item is {"id", "winner_latent", "loser_latent", "text_emb" (zero-padded to `text_len`, as WanPipeline pads),
"text_len"} plus, for I2V, the pair's shared "clip_emb" and "cond_latent" (stored with the winner). Shards are
memory-mapped lazily in each process (DataLoader workers included); nothing is unpickled.
"""

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from megatron_wan.data.shards import ShardReader
from megatron_wan.encoders import TEXT_LEN, pad_text


def _read_pairs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class PairDataset(Dataset):
    """`pairs` (a JSONL of pairs; default DIR/train.jsonl) over the shards of `directory`."""

    def __init__(self, directory, pairs=None, text_len: int = TEXT_LEN):
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
        return self._reader(self._where[key])[key]

    @property
    def shapes(self) -> list[tuple]:
        """The latent shape of every pair, in order: what BucketBatchSampler groups by."""
        return list(self._shapes)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        win, lose = self._sample(pair["winner"]["id"]), self._sample(pair["loser"]["id"])
        item = {"id": pair["id"], "winner_latent": win["latent"], "loser_latent": lose["latent"],
                "text_emb": pad_text(win["text_emb"], self.text_len), "text_len": win["text_emb"].shape[0]}
        if self.task == "i2v":
            item["clip_emb"], item["cond_latent"] = win["clip_emb"], win["cond_latent"]
        return item
