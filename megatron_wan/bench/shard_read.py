"""Shard read throughput vs. per-sample torch.save files, measured in one run.

    python -m megatron_wan.bench.shard_read [--samples 24] [--sizes small 720p] [--repeats 7] [--dir DIR]

For each latent size the same random samples (a bf16 `latent` and a bf16 `text_emb` [100, 4096]) are
written as one shard (megatron_wan.data.shards) and as a directory of per-sample torch.save files (one
.pt holding a dict: the DiffSynth-Studio / finetrainers cache layout) in a temporary directory. Then a
random permutation of all samples is read from each, every byte copied into a preallocated buffer per
field (the collate step): shards through zero-copy views, torch.load with weights_only=True. Printed:
samples/s of each (median of passes alternating between the two, each after a warm-up pass; the shard
reader is reopened for every pass, so mapping its pages is counted every time) and the ratio
shards / torch.save.

The page cache cannot be dropped here: both sides read files just written, from memory, so this
measures open + deserialization + copy cost, not disk bandwidth.
"""

import argparse
import json
import os
import statistics
import tempfile

import torch

from megatron_wan.data.shards import ShardReader, ShardWriter
from megatron_wan.throughput import time_it

SIZES = {"tiny": (16, 1, 4, 4), "small": (16, 5, 32, 32), "720p": (16, 21, 90, 160)}  # latent [C, F, H, W]
TEXT_SHAPE = (100, 4096)


def _sample(i, latent_shape):
    g = torch.Generator().manual_seed(i)
    return {"latent": torch.randn(latent_shape, generator=g).bfloat16(),
            "text_emb": torch.randn(TEXT_SHAPE, generator=g).bfloat16()}


def _write(root, n, latent_shape):
    prefix, pt_dir = os.path.join(root, "shard"), os.path.join(root, "pt")
    os.makedirs(pt_dir)
    with ShardWriter(prefix, metadata={"bench": "shard_read", "latent_shape": list(latent_shape)}) as w:
        for i in range(n):
            sample = _sample(i, latent_shape)
            w.add(str(i), sample)
            torch.save(sample, os.path.join(pt_dir, f"{i}.pt"))
    return prefix, pt_dir


def _read_shards(prefix, keys, buffers):
    reader = ShardReader(prefix)
    for key in keys:
        for name, t in reader.get(key, copy=False).items():
            buffers[name].copy_(t)


def _read_torch_save(pt_dir, keys, buffers):
    for key in keys:
        for name, t in torch.load(os.path.join(pt_dir, f"{key}.pt"), weights_only=True).items():
            buffers[name].copy_(t)


def _measure(latent_shape, keys, repeats, tmp_dir):
    """Median seconds to read all `keys` from shards and from torch.save files, and MB per sample."""
    with tempfile.TemporaryDirectory(prefix="shard_read_", dir=tmp_dir) as root:
        prefix, pt_dir = _write(root, len(keys), latent_shape)
        ours = {k: torch.empty_like(v) for k, v in _sample(0, latent_shape).items()}
        theirs = {k: torch.empty_like(v) for k, v in ours.items()}
        t_ours, t_theirs = [], []
        for _ in range(repeats):  # alternate, so that drift in the machine hits both sides alike
            t_ours.append(time_it(lambda: _read_shards(prefix, keys, ours), repeats=1))
            t_theirs.append(time_it(lambda: _read_torch_save(pt_dir, keys, theirs), repeats=1))
    if not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise RuntimeError(f"shards and torch.save files disagree on sample {keys[-1]}")
    return statistics.median(t_ours), statistics.median(t_theirs), sum(t.nbytes for t in ours.values()) / 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=24, help="samples per size")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["small", "720p"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where to write the temporary files (default: the system's)")
    args = ap.parse_args(argv)

    n = args.samples
    keys = [str(i) for i in torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()]
    print(f"{n} samples per size, read in a random order, median of {args.repeats}; "
          f"{torch.get_num_threads()} threads; files in the page cache")
    print(f"{'size':<8}{'latent':>18}{'MB/sample':>11}{'shards/s':>11}{'torch.save/s':>14}{'ratio':>8}")
    summary = {}
    for size in args.sizes:
        t_ours, t_theirs, mb = _measure(SIZES[size], keys, args.repeats, args.dir)
        ours_rate, theirs_rate = n / t_ours, n / t_theirs
        print(f"{size:<8}{'x'.join(map(str, SIZES[size])):>18}{mb:>11.2f}{ours_rate:>11.1f}{theirs_rate:>14.1f}"
              f"{ours_rate / theirs_rate:>8.2f}")
        summary[f"{size}_shards_samples_per_s"] = ours_rate
        summary[f"{size}_torch_save_samples_per_s"] = theirs_rate
        summary[f"{size}_shards_vs_torch_save"] = ours_rate / theirs_rate
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
