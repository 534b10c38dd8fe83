"""verify: check an encoded dataset directory against its manifest.json.

Every listed shard must exist with the recorded SHA-256 of its .bin and .idx, open (sizes agree with the
index) and pass its per-sample CRC32; sample counts must add up, no key may sit in two shards, and every
pair in pairs/train/test.jsonl must refer to encoded samples. Exits non-zero naming the first problem.
"""

import json
import sys
from pathlib import Path

from tqdm import tqdm

from data_tools.stage import read_jsonl
from megatron_wan.data.shards import ShardReader
from megatron_wan.files import file_sha256


def verify(directory) -> dict:
    """Check `directory` (see the module docstring); returns counts, raises ValueError naming the problem."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.exists():
        raise ValueError(f"{path}: missing (the encode run has not completed every --shard part)")
    manifest = json.loads(path.read_text())
    keys = {}
    for entry in tqdm(manifest["shards"], desc="verify", unit="shard", file=sys.stderr):
        prefix = directory / entry["prefix"]
        for ext in ("bin", "idx"):
            found = file_sha256(f"{prefix}.{ext}")
            if found != entry[f"{ext}_sha256"]:
                raise ValueError(f"{prefix}.{ext}: SHA-256 {found} differs from {entry[f'{ext}_sha256']} in {path}")
        reader = ShardReader(prefix)
        if reader.verify() != entry["samples"]:
            raise ValueError(f"{prefix}.idx: {len(reader)} samples, {path} says {entry['samples']}")
        for key in reader.keys():
            if key in keys:
                raise ValueError(f"sample {key!r} is in both {keys[key]} and {entry['prefix']}")
            keys[key] = entry["prefix"]
    if len(keys) != manifest["samples"]:
        raise ValueError(f"{path}: says {manifest['samples']} samples, the shards hold {len(keys)}")
    pairs = read_jsonl(directory / "pairs.jsonl")
    for pair in pairs:
        for side in ("winner", "loser"):
            if pair[side]["id"] not in keys:
                raise ValueError(f"{directory / 'pairs.jsonl'}: pair {pair['id']!r} {side} {pair[side]['id']!r} "
                                 "is in no shard")
    if len(pairs) != manifest["pairs"]:
        raise ValueError(f"{path}: says {manifest['pairs']} pairs, pairs.jsonl has {len(pairs)}")
    return {"shards": len(manifest["shards"]), "samples": len(keys), "pairs": len(pairs)}


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.add_argument("directory", help="an encode output directory")


def run(args) -> dict:
    try:
        counts = verify(args.directory)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"data_tools verify: FAILED: {e}")
    print(f"verify: OK: {counts['shards']} shards, {counts['samples']} samples, {counts['pairs']} pairs "
          f"in {args.directory}")
    return counts
