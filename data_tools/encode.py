"""encode: GT-Pairs -> pre-encoded shards (Appendix A.2 item 4, extended to latents and I2V conditioning).

`--in` is the pair stage's output (or a pairs JSONL), `--model` a Wan 2.1 or 2.2 folder in diffusers layout (Wan 2.2:
its VAE, no CLIP; TI2V-5B's cond_latent is the image's latent [48, 1, H', W']). Every
distinct video of the pairs is encoded once, into a sample keyed by its id:
  latent       VAE latent [16, F', H', W'], (z - latents_mean) / latents_std (posterior mean; --sample-posterior)
  text_emb     umT5 states of the pair's prompt, trimmed to its real length [L, 4096]
  clip_emb     I2V: CLIP penultimate states of the pair's reference image [257, 1280]
  cond_latent  I2V: first-frame mask + VAE latent of [image, zeros...] [20, F', H', W']
with fps, frames, size, prompt SHA-256 and source ids in the shard's metadata. A value that is not finite or
exceeds 1e3 in magnitude rejects the video, named, and nothing of it is written.

Outputs in DIR: shards `part-I-of-N-J.{bin,idx}` (`--samples-per-shard` each), journal.I-of-N.jsonl and
rejects.I-of-N.jsonl (the rejected videos; data_tools.stage's runner writes them), and, once
every `--shard` part is done, manifest.json (counts, per-shard SHA-256, encoder identity, latent
normalization), pairs.jsonl / train.jsonl / test.jsonl (the pairs whose videos are all encoded, same latent
shape) and rejects.jsonl. A killed run resumes: finalized shards are kept, at most one shard is redone.
`python -m data_tools verify DIR` checks all of it.
"""

import collections
import functools
import hashlib
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from data_tools.media import read_frames
from data_tools.stage import Reject, add_device_arguments, input_records, read_journal, run_stage, write_jsonl
from megatron_wan.data.shards import ShardReader, ShardWriter
from megatron_wan.dtypes import DTYPES
from megatron_wan.files import atomic_write, file_sha256
from megatron_wan.models import spec_for_folder, task, task_names

LIMIT = 1e3


def distinct_videos(pairs: list[dict], task_name: str) -> list[dict]:
    """Each video of the pairs once, in order of first appearance, with the prompt (and for a task conditioned on
    an image, I2V, the reference image) its pair conditions it on; a video conditioned two ways is an error naming
    it and both pairs."""
    image = task(task_name).image
    videos = {}
    for pair in pairs:
        for side in ("winner", "loser"):
            ref = pair.get(side) or {}
            if "id" not in ref or "path" not in ref:
                raise ValueError(f"pair {pair.get('id')!r}: {side} needs an id and a path, found {ref}")
            if not pair.get("prompt"):
                raise ValueError(f"pair {pair.get('id')!r}: no prompt")
            if image and not pair.get("image"):
                raise ValueError(f"pair {pair.get('id')!r}: {task_name} encoding needs the reference image ('image')")
            video = {"id": ref["id"], "path": ref["path"], "prompt": pair["prompt"],
                     "image": pair.get("image") if image else None, "pair": pair.get("id")}
            seen = videos.setdefault(ref["id"], video)
            if (seen["prompt"], seen["image"]) != (video["prompt"], video["image"]):
                raise ValueError(f"video {ref['id']!r} is conditioned differently in pairs {seen['pair']!r} and "
                                 f"{pair.get('id')!r} (prompt or image); one sample per video needs one condition")
    return list(videos.values())


def checked(key: str, fields: dict) -> dict:
    """`fields`, or Reject naming the field with a non-finite or absurd (|x| > 1e3) value."""
    for name, t in fields.items():
        t32 = t.float()
        if not torch.isfinite(t32).all():
            raise Reject(f"sample {key!r}: {name} has non-finite values")
        if t32.abs().max() > LIMIT:
            raise Reject(f"sample {key!r}: {name} reaches |x| = {t32.abs().max().item():.3g} > {LIMIT:g}")
    return fields


class _Cache(collections.OrderedDict):
    """The last few conditionings: a GT and its generated videos share prompt and image."""

    def get_or(self, key, make):
        if key not in self:
            self[key] = make()
            if len(self) > 16:
                self.popitem(last=False)
        return self[key]


def _decode(video: dict, geometry):
    try:
        frames = read_frames(video["path"])
    except Exception as e:
        raise Reject(f"cannot decode {video['path']}: {e}") from e
    f, h, w, _ = frames.shape
    problem = geometry.problem(f, h, w)  # the VAE's frame-count rule, sides divisible by its stride x the patch
    if problem:
        raise Reject(problem)
    return frames


class Encoder:
    """Encodes one video at a time into its sample fields and metadata."""

    def __init__(self, encoders, sample_posterior: bool, seed: int):
        self.encoders, self.sample_posterior, self.seed = encoders, sample_posterior, seed
        self.texts, self.images = _Cache(), _Cache()

    def __call__(self, video: dict, frames) -> tuple[dict, dict]:
        enc = self.encoders
        key = video["id"]
        generator = None
        if self.sample_posterior:
            digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
            generator = torch.Generator(enc.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        fields = {"latent": enc.video(frames, sample_posterior=self.sample_posterior, generator=generator),
                  "text_emb": self.texts.get_or(video["prompt"], lambda: enc.text([video["prompt"]])[0])}
        if enc.needs_image:
            def conditioning():
                with Image.open(video["image"]) as im:
                    return enc.image_fields(im.convert("RGB"), len(frames))
            fields.update(self.images.get_or((video["image"], len(frames)), conditioning))
            if fields["cond_latent"].shape[2:] != fields["latent"].shape[2:]:  # the sides (TI2V's is one frame)
                raise Reject(f"reference image {video['image']} is {Image.open(video['image']).size}, the video "
                             f"{frames.shape[2]}x{frames.shape[1]}: they must match")
        meta = {"fps": enc.geometry.fps, "frames": len(frames), "width": frames.shape[2], "height": frames.shape[1],
                "prompt_sha256": hashlib.sha256(video["prompt"].encode()).hexdigest(), "source_id": key,
                "path": video["path"], "image": video["image"]}
        return checked(key, fields), meta


def shard_prefixes(out: Path) -> list[Path]:
    """Prefixes of the finalized shards in `out` (a shard exists once its .idx does)."""
    return sorted(p.with_suffix("") for p in out.glob("part-*.idx"))


def _existing(out: Path, identity: dict) -> set[str]:
    keys = set()
    for prefix in shard_prefixes(out):
        reader = ShardReader(prefix)
        found = reader.metadata.get("encoder")
        if found != identity:
            sys.exit(f"data_tools encode: {prefix}.idx was encoded with {found}, this run uses {identity}; "
                     f"write to a new --out")
        keys.update(reader.keys())
    return keys


class _Shards:
    """The encode stage's sink: rolls samples into part-I-of-N-J shards of `size` samples, each published with its
    SHA-256 sidecar; `done` holds the keys of every finalized shard in `out` (what a re-run skips)."""

    def __init__(self, out: Path, shard: tuple[int, int], size: int, identity: dict):
        self.out, self.size, self.metadata = out, size, {"encoder": identity}
        self.done = _existing(out, identity)
        self.stem = f"part-{shard[0]:05d}-of-{shard[1]:05d}"
        self.next = len(list(out.glob(f"{self.stem}-*.idx")))
        self.writer, self.samples = None, {}

    def add(self, key, output):
        fields, meta = output
        if self.writer is None:
            self.writer = ShardWriter(self.out / f"{self.stem}-{self.next:05d}", {})
        self.writer.add(key, fields)
        self.samples[key] = meta
        if len(self.samples) == self.size:
            self.close()

    def close(self):
        if self.writer is None:
            return
        self.writer.metadata = {**self.metadata, "samples": self.samples}
        self.writer.finalize()
        _write_sidecar(Path(self.writer.idx_path).with_suffix(""))
        self.done |= self.samples.keys()
        self.writer, self.samples, self.next = None, {}, self.next + 1


def _write_sidecar(prefix: Path) -> dict:
    digest = {"bin_sha256": file_sha256(f"{prefix}.bin"), "idx_sha256": file_sha256(f"{prefix}.idx")}
    atomic_write(prefix.with_suffix(".sha256.json"), json.dumps(digest))
    return digest


def _digest(prefix: Path) -> dict:
    sidecar = prefix.with_suffix(".sha256.json")
    return json.loads(sidecar.read_text()) if sidecar.exists() else _write_sidecar(prefix)


def assemble(out: Path, pairs: list[dict], encoding: dict) -> dict:
    """manifest.json, pairs/train/test.jsonl and rejects.jsonl from every finalized shard and rejects file."""
    shards, shapes = [], {}
    for prefix in shard_prefixes(out):
        reader = ShardReader(prefix)
        shards.append({"prefix": prefix.name, "samples": len(reader), **_digest(prefix)})
        for key in reader.keys():
            if key in shapes:
                sys.exit(f"data_tools encode: sample {key!r} is in two shards ({prefix.name} and another)")
            shapes[key] = reader.spec(key)["latent"][1]
    video_rejects = {r["id"]: r for path in sorted(out.glob("rejects.*-of-*.jsonl")) for r in read_journal(path)}
    kept, pair_rejects = [], []
    for pair in pairs:
        w, lo = pair["winner"]["id"], pair["loser"]["id"]
        missing = [k for k in (w, lo) if k not in shapes]
        if missing:
            why = "; ".join(f"{k}: {video_rejects[k]['reason'] if k in video_rejects else 'not encoded'}"
                            for k in missing)
            pair_rejects.append({"id": pair["id"], "reason": f"video not encoded ({why})", "stage": "encode"})
        elif shapes[w] != shapes[lo]:
            pair_rejects.append({"id": pair["id"], "stage": "encode",
                                 "reason": f"winner latent {shapes[w]} and loser latent {shapes[lo]} differ"})
        else:
            kept.append(pair)
    manifest = {"format": "megatron_wan-shards", "version": 1, **encoding, "samples": len(shapes),
                "pairs": len(kept), "shards": shards}
    write_jsonl(out / "pairs.jsonl", kept)
    for split in ("train", "test"):
        write_jsonl(out / f"{split}.jsonl", [p for p in kept if p.get("split", "train") == split])
    write_jsonl(out / "rejects.jsonl", [*video_rejects.values(), *pair_rejects])
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.add_argument("--model", required=True, help="Wan 2.1 or 2.2 folder in diffusers layout")
    parser.add_argument("--task", choices=task_names(), help="default: i2v when the folder has an image_encoder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="encoders' and stored dtype")
    add_device_arguments(parser)
    parser.add_argument("--sample-posterior", action="store_true", help="sample the VAE posterior (seeded per video)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=64)


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    i, n = args.shard
    try:
        pairs = input_records(args.input)
        encoders = spec_for_folder(args.model).conditioner(args.model, args.task, args.device, DTYPES[args.dtype],
                                                           offload=args.offload and args.device != "cpu")
        videos = distinct_videos(pairs, encoders.task)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"data_tools encode: {e}")
    identity = {**encoders.identity(), "posterior": "sample" if args.sample_posterior else "mean",
                "seed": args.seed if args.sample_posterior else None}
    identity.pop("model")  # where the folder lives does not change what it encodes
    encoding = {"encoder": identity, "model": str(Path(args.model).resolve()),
                "latent_normalization": encoders.latent_normalization()}
    shards = _Shards(out, (i, n), args.samples_per_shard, identity)
    summary = run_stage("encode", videos, Encoder(encoders, args.sample_posterior, args.seed), out,
                        workers=args.workers, shard=(i, n), in_process=True, sink=shards,
                        prefetch=functools.partial(_decode, geometry=encoders.geometry),
                        suffix=f".{i}-of-{n}")  # always -of-N: assemble gathers every part's rejects
    atomic_write(out / f"done.{i}-of-{n}", json.dumps({"encoded": summary["accepted"],
                                                       "rejected": summary["rejected"]}))
    summary = {"stage": "encode", "shard": summary["shard"], "videos": summary["inputs"],
               "already_done": summary["already_done"], "encoded": summary["accepted"],
               "rejected": summary["rejected"]}
    if all((out / f"done.{k}-of-{n}").exists() for k in range(n)):
        manifest = assemble(out, pairs, encoding)
        summary.update(samples=manifest["samples"], pairs=manifest["pairs"], shards=len(manifest["shards"]))
        print(f"encode: dataset: {summary['samples']} samples, {summary['pairs']} pairs -> {out}")
    return summary
