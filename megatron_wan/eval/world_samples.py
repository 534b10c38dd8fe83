"""Videos of world prompts from a Wan pipeline folder (its own transformer, or a trained one), laid out for the world
metrics: OUT/samples/NNNN-sK.mp4 and OUT/samples.jsonl, one row per video with its path, caption, shape, colour,
direction, split and seed, so that anyone can rescore them (`python -m megatron_wan.eval world`)."""

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_wan.eval.world_vocab import FRAMES, SIZE, parse_caption
from megatron_wan.files import atomic_path

TRUTH = ("caption", "shape", "colour", "direction", "split")


@dataclass(frozen=True)
class WorldSampling:
    """How world videos are sampled: UniPC, few steps, no classifier-free guidance (the trainer has no caption
    dropout, so the model never learned an unconditional prediction to guide against)."""

    steps: int = 20
    shift: float = 3.0
    guidance_scale: float = 1.0
    frames: int = FRAMES
    size: int = SIZE


def sample_world(model, rows: list[dict], seeds: list[int], out, transformer=None,
                 sampling: WorldSampling = WorldSampling()) -> Path:
    """Sample every row's caption (rows: world attribute rows, or {caption} alone) with every seed into `out`;
    returns OUT/samples.jsonl. Videos already written are kept (a re-run only adds the missing ones). Needs the
    process groups initialized (megatron_wan.parallel.initialize)."""
    from PIL import Image

    from megatron_wan.sampling import SamplingConfig, WanSampler, save_video

    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    sampler = WanSampler(model, transformer=transformer)
    config = SamplingConfig("unipc", sampling.steps, sampling.shift, sampling.guidance_scale)
    shape = sampler.latent_shape(sampling.frames, sampling.size, sampling.size)
    listed = []
    for i, row in enumerate(rows):
        truth = {**parse_caption(row["caption"]), **{k: row[k] for k in TRUTH if k in row}}
        paths = [out / "samples" / f"{i:04d}-s{seed}.mp4" for seed in seeds]
        missing = [(seed, p) for seed, p in zip(seeds, paths) if not p.exists()]
        if missing:
            image = Image.open(row["image"]).convert("RGB") if sampler.needs_image else None
            cond = sampler.conditions(row["caption"], sampling.frames, image)
            videos = sampler.decode(sampler.sample(cond, shape, [s for s, _ in missing], config))
            for (_, path), video in zip(missing, videos):
                with atomic_path(path) as tmp:
                    save_video(tmp, video, sampler.geometry.fps)
        listed += [{"path": str(p.relative_to(out)), **truth, "seed": seed} for seed, p in zip(seeds, paths)]
    with atomic_path(out / "samples.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in listed), encoding="utf-8")
    return out / "samples.jsonl"
