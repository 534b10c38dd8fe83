"""generate: the base model's own videos of the GT videos, the losers of GT-Pairs (Appendix A.1, data generation).

For every normalized GT record (`--in`, the normalize output: prompt, reference image, size, frame count) it samples
`--samples` K videos with the Wan 2.1 model of `--model` at the GT's width, height and frame count; an I2V model is
conditioned on the GT's reference image as well. Video j of GT `g` has the id `g.GENERATOR.j` and the seed
sha256(SEED:id), so any one of them can be made again alone. They are written at 16 fps, the GT's format after
normalize (16 fps, its size, its frame count): they need no import-generated / normalize pass and go straight to
`pair --generated DIR`.

Outputs in DIR: videos/ID.mp4; manifest[.I-of-N].jsonl, one record per video (id, path, gt_id, generator, seed,
the GT's prompt, image and aspect bucket, the video's metadata); rejects[.I-of-N].jsonl (a GT record that cannot be
sampled, or a video with non-finite latents, with the reason); journal[.I-of-N].jsonl. Resumable per video: each is
written under a temporary name and renamed when whole, then journaled; a re-run makes only the videos not journaled.
One process per GPU (`--workers` is not used): spread the GT videos over GPUs with `--shard I/N` (SLURM arrays).

Weights: `--model` is a Wan 2.1 folder in diffusers layout (umT5, VAE, for I2V CLIP, and unless `--transformer` is
given, its transformer/); `--transformer` is a diffusers transformer folder or, with `--layout original`, an original
Wan-AI checkpoint folder. On a CPU, use a tiny random folder (megatron_wan.models.wan21.tiny.write_tiny_wan).
A Wan 2.2 folder samples with both A14B experts (switching at the folder's boundary_ratio; `--guidance-scale-2` is the
low-noise expert's scale), or TI2V-5B (`--task i2v` conditions it on the GT's reference image as its first frame);
`--transformer` is then a folder holding both experts (diffusers pipeline layout, or high_noise_model/ and
low_noise_model/ with `--layout original`).
"""

import glob
import hashlib
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from data_tools.encode import add_device_arguments
from data_tools.media import video_metadata
from data_tools.normalize import add_spec_arguments
from data_tools.stage import Reject, atomic_path, input_records, read_journal, remove_leftovers, write_jsonl
from megatron_wan.models.wan21.conditioner import DTYPES
from megatron_wan.sampling import FPS, SOLVERS, WAN_NEGATIVE_PROMPT, SamplingConfig, WanSampler, save_video


def sample_seed(seed: int, video_id: str) -> int:
    """The seed of one generated video: a pure function of the base seed and its id."""
    digest = hashlib.sha256(f"{seed}:{video_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prepare(sampler: WanSampler, gt: dict):
    """(latent shape, conditions) of a GT record; Reject when it is not a normalized GT the model can follow."""
    needed = ["prompt", "width", "height", "frames", "fps"] + (["image"] if sampler.task == "i2v" else [])
    missing = [k for k in needed if not gt.get(k)]
    if missing:
        raise Reject(f"GT record without {missing} (expected the normalize stage's output)")
    if abs(float(gt["fps"]) - FPS) > 1e-3:
        raise Reject(f"GT at {float(gt['fps']):g} fps; generated videos are {FPS} fps (normalize the GT first)")
    try:
        shape = sampler.latent_shape(int(gt["frames"]), int(gt["height"]), int(gt["width"]))
        image = None
        if sampler.task == "i2v":
            with Image.open(gt["image"]) as im:
                image = im.convert("RGB")
        return shape, sampler.conditions(gt["prompt"], int(gt["frames"]), image)
    except (OSError, ValueError) as e:
        raise Reject(str(e)) from e


class Generation:
    """The model, the sampling settings and where the videos go."""

    def __init__(self, sampler: WanSampler, config: SamplingConfig, args):
        self.sampler, self.config = sampler, config
        self.videos = Path(args.out).resolve() / "videos"
        self.generator = args.generator or Path(args.transformer or args.model).resolve().name
        self.seed, self.crf, self.preset = args.seed, args.crf, args.preset

    def ids(self, gt: dict, count: int) -> list[str]:
        return [f"{gt['id']}.{self.generator}.{j}" for j in range(count)]

    def video(self, gt: dict, video_id: str, shape, cond) -> dict:
        """Sample, decode and write one video of `gt`: its manifest record; Reject for non-finite latents."""
        seed, path = sample_seed(self.seed, video_id), self.videos / f"{video_id}.mp4"
        latents = self.sampler.sample(cond, shape, [seed], self.config)
        if not torch.isfinite(latents).all():
            raise Reject(f"video {video_id!r} (seed {seed}): the sampled latents are not finite")
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.stem)}.tmp-*{path.suffix}"):  # left by a killed run
            stale.unlink()
        with atomic_path(path) as tmp:
            save_video(tmp, self.sampler.decode(latents)[0], FPS, self.crf, self.preset)
        return {"id": video_id, "gt_id": gt["id"], "generator": self.generator, "seed": seed, "prompt": gt["prompt"],
                "image": gt.get("image"), "aspect_bucket": gt.get("aspect_bucket"), **video_metadata(path),
                "path": str(path)}


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.add_argument("--model", required=True, help="Wan 2.1 folder in diffusers layout")
    parser.add_argument("--transformer", help="DiT weights from elsewhere: a diffusers transformer folder, or an "
                                              "original Wan-AI checkpoint folder with --layout original")
    parser.add_argument("--layout", choices=("diffusers", "original"), default="diffusers",
                        help="layout of --transformer")
    parser.add_argument("--generator", help="name in the records and ids (default: the weights' folder name)")
    parser.add_argument("--samples", type=int, default=1, help="videos per GT video")
    parser.add_argument("--solver", choices=SOLVERS, default="unipc")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shift", type=float, default=5.0, help="sigma shift: Wan 2.1 uses 5.0 at 720p, 3.0 at 480p")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (<= 1: none)")
    parser.add_argument("--guidance-scale-2", type=float, default=None,
                        help="Wan 2.2 A14B: the low-noise expert's guidance (default: --guidance-scale)")
    parser.add_argument("--task", choices=("t2v", "i2v"), default=None,
                        help="default: the folder's; Wan 2.2 TI2V-5B does both (i2v: the GT image as first frame)")
    parser.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT, help="default: Wan 2.1's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32",
                        help="the DiT's dtype (default: bf16 on a GPU, as Wan 2.1 samples)")
    parser.add_argument("--encoder-dtype", choices=sorted(DTYPES), default="fp32", help="umT5's, the VAE's, CLIP's")
    add_device_arguments(parser)
    add_spec_arguments(parser)


def run(args) -> dict:
    i, n = args.shard
    suffix = "" if n == 1 else f".{i}-of-{n}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        gts = [r for k, r in enumerate(input_records(args.input)) if k % n == i]
        config = SamplingConfig(args.solver, args.steps, args.shift, args.guidance_scale, args.negative_prompt,
                                guidance_scale_2=args.guidance_scale_2)
        sampler = WanSampler(args.model, transformer=args.transformer, layout=args.layout, device=args.device,
                             task=args.task,
                             dtype=DTYPES[args.dtype], encoder_dtype=DTYPES[args.encoder_dtype],
                             offload=args.offload and args.device != "cpu")
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"data_tools generate: {e}")
    job = Generation(sampler, config, args)
    plan = [(gt, job.ids(gt, args.samples)) for gt in gts]
    journal_path = out / f"journal{suffix}.jsonl"
    done = {entry["id"]: entry for entry in read_journal(journal_path, repair=True)}
    already = sum(v in done for _, ids in plan for v in ids)
    todo = [(gt, [v for v in ids if v not in done]) for gt, ids in plan if gt["id"] not in done]
    todo = [(gt, ids) for gt, ids in todo if ids]
    remove_leftovers(out, (v for _, ids in todo for v in ids), suffix)
    bar = tqdm(total=sum(len(ids) for _, ids in todo), desc="generate", unit="video", file=sys.stderr, disable=not todo)
    with open(journal_path, "a", encoding="utf-8") as journal:

        def record(entry):
            journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
            journal.flush()
            done[entry["id"]] = entry

        for gt, ids in todo:
            try:
                shape, cond = prepare(sampler, gt)
            except Reject as e:
                record({"id": gt["id"], "path": gt.get("path"), "rejected": str(e)})
                bar.update(len(ids))
                continue
            for video_id in ids:
                try:
                    record({"id": video_id, "accepted": job.video(gt, video_id, shape, cond)})
                except Reject as e:
                    record({"id": video_id, "path": gt.get("path"), "rejected": str(e)})
                bar.update()
    bar.close()
    entries = [done[k] for gt, ids in plan for k in (gt["id"], *ids) if k in done]
    accepted = [e["accepted"] for e in entries if "accepted" in e]
    rejects = [{"id": e["id"], "path": e.get("path"), "reason": e["rejected"], "stage": "generate"}
               for e in entries if "rejected" in e]
    write_jsonl(out / f"manifest{suffix}.jsonl", accepted)
    write_jsonl(out / f"rejects{suffix}.jsonl", rejects)
    summary = {"stage": "generate", "shard": f"{i}/{n}", "inputs": len(gts), "videos": len(accepted),
               "rejected": len(rejects), "already_done": already}
    print(f"generate: {len(gts)} GT videos, {len(accepted)} videos ({already} already done), {len(rejects)} rejected "
          f"-> {out}")
    return summary
