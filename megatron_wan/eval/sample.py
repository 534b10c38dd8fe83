"""Videos of a test set from the base model and from training checkpoints, laid out for VBench's custom-input mode.

    python -m megatron_wan.eval sample --model BASE_DIR --pairs ENCODED/test.jsonl --out DIR \\
        [--checkpoint NAME=RUN_DIR_OR_STEP ...] [--no-base] [--steps 50 --solver unipc --shift 5.0]

For every method (`Base` = the model folder's own transformer, and each checkpoint, exported once to
DIR/_transformers/NAME with its LoRA merged) and every distinct (prompt, reference image) of the test pairs, it
writes DIR/NAME/PROMPT-K.mp4 (K = 0..--videos-per-prompt - 1): VBench's custom-input mode reads the prompt from the
file name. DIR/NAME/prompts.json maps each file to its full prompt (for VBench's prompt file, and for prompts too
long for a file name). The video has the reference image's size and `--frames` frames. Runs under torchrun with
context parallelism (every rank samples, rank 0 writes); a re-run skips the videos already written.
"""

import json
import os
import re
from pathlib import Path

from megatron_wan.eval.tables import named_path

BASE = "Base"


def file_stem(prompt: str, limit: int = 180) -> str:
    """The prompt as a file name stem: path separators and control characters replaced, length capped."""
    return re.sub(r"[/\\\x00-\x1f]", " ", prompt).strip()[:limit]


def test_items(pairs_path) -> list[dict]:
    """Distinct (prompt, image) of a pairs JSONL, in order; a pair without them is an error naming it."""
    items, seen = [], set()
    with open(pairs_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            pair = json.loads(line)
            if not pair.get("prompt") or not pair.get("image"):
                raise ValueError(f"{pairs_path}:{n}: pair {pair.get('id')!r} needs a prompt and a reference image")
            key = (pair["prompt"], pair["image"])
            if key not in seen:
                seen.add(key)
                items.append({"prompt": pair["prompt"], "image": pair["image"]})
    return items


def _transformer(name: str, checkpoint: Path, model: Path, cache: Path) -> Path:
    import torch.distributed as dist

    from megatron_wan.export import export

    folder = cache / name
    if dist.get_rank() == 0 and not (folder / "transformer").exists():
        export(checkpoint, folder, formats=("transformer",), base=model)
    dist.barrier()
    return folder / "transformer"


def sample_method(sampler, items: list[dict], out: Path, args) -> int:
    """Every item's videos into `out`; returns how many were written now."""
    import torch.distributed as dist
    from PIL import Image

    from megatron_wan.sampling import SamplingConfig, save_video

    config = SamplingConfig(args.solver, args.steps, args.shift, args.guidance_scale,
                            guidance_scale_2=args.guidance_scale_2)
    out.mkdir(parents=True, exist_ok=True)
    prompts, written = {}, 0
    for i, item in enumerate(items):
        image = Image.open(item["image"]).convert("RGB")
        stem = file_stem(item["prompt"])
        for k in range(args.videos_per_prompt):
            path = out / f"{stem}-{k}.mp4"
            prompts[path.name] = item["prompt"]
            if path.exists():
                continue
            cond = sampler.conditions(item["prompt"], args.frames, image if sampler.task == "i2v" else None)
            shape = sampler.latent_shape(args.frames, image.height, image.width)
            video = sampler.decode(sampler.sample(cond, shape, [args.seed + 1000 * i + k], config))[0]
            if dist.get_rank() == 0:
                tmp = path.with_name(f".{path.stem}.tmp.mp4")
                save_video(tmp, video)
                tmp.replace(path)
            written += 1
    if dist.get_rank() == 0:
        (out / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False, indent=1), encoding="utf-8")
    return written


def add_arguments(parser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the base Wan folder (diffusers layout)")
    parser.add_argument("--pairs", type=Path, required=True, help="test pairs JSONL (e.g. ENCODED/test.jsonl)")
    parser.add_argument("--checkpoint", type=named_path, action="append", default=[], metavar="NAME=PATH",
                        help="a run's output dir, checkpoints/ or step folder; repeat per method")
    parser.add_argument("--no-base", dest="base", action="store_false", help="skip the base model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--videos-per-prompt", type=int, default=1)
    parser.add_argument("--solver", default="unipc")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--guidance-scale-2", type=float, default=None,
                        help="Wan 2.2 A14B: the low-noise expert's guidance (default: --guidance-scale)")
    parser.add_argument("--task", choices=("t2v", "i2v"), default=None,
                        help="default: the folder's; Wan 2.2 TI2V-5B does both (i2v: the image as first frame)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context-parallel", type=int, default=None, help="default: the world size")


def run(args) -> dict:
    import torch.distributed as dist

    from megatron_wan import parallel
    from megatron_wan.sampling import WanSampler

    items = test_items(args.pairs)
    if not items:
        raise ValueError(f"{args.pairs}: no test pairs")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.context_parallel not in (None, world):
        raise ValueError(f"--context-parallel {args.context_parallel}: sampling uses every rank for CP "
                         f"(world size {world})")
    parallel.initialize(1, world)
    methods = ([(BASE, None)] if args.base else []) + list(args.checkpoint)
    counts = {}
    for name, checkpoint in methods:
        transformer = _transformer(name, checkpoint, args.model, args.out / "_transformers") if checkpoint else None
        sampler = WanSampler(args.model, transformer=transformer, task=args.task)
        counts[name] = sample_method(sampler, items, args.out / name, args)
        if dist.get_rank() == 0:
            print(f"sample: {name}: {counts[name]} new videos ({len(items) * args.videos_per_prompt} in all) -> "
                  f"{args.out / name}")
    return counts
