"""`make world` (python -m launch.world --out outputs/world): the world's base model, built here from nothing.

1. clips: `data_tools world` (procedural clips with known truth, data_tools.world);
2. the data path unchanged: probe -> select -> filter -> normalize `--format world` (RELAXED lists the flags that
   differ from the defaults, and why);
3. the VAE: diffusers' AutoencoderKLWan trained from scratch on the `train` clips (launch.world_vae);
4. an initial pipeline folder: that VAE, a tiny random umT5 with the world's word-level tokenizer (frozen: it only has
   to tell the captions apart), a random DiT (`world` preset), the scheduler;
5. the DiT trained by this project's own trainer (`objective.mode: sft`, full fine-tuning, 2 ranks) on the encoded
   `train` clips, configs/world-base-sft.yaml, stopped early on purpose so that there is room to improve;
6. OUT/base: the initial folder with the trained transformer (WanPipeline.from_pretrained loads it);
7. the table: world metrics (megatron_wan.eval.world) of the real clips, the random-weights model and the base on
   the same prompts and seeds, per split, in OUT/summary.md and OUT/summary.json.
Every step is reused when its output exists; each prints its wall time.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launch.demo import data_tools
from megatron_wan.files import atomic_path

REPO = Path(__file__).resolve().parents[1]
SHIFT = 3.0  # the scheduler's flow shift, the recipe's objective.shift and the samples'

RELAXED = {  # the data stages' flags for world clips, and why
    "select": ["--min-edge", "32", "--duration", "1", "2", "--aspects", "1:1"],  # 32x32 clips of 1.06 s, square
    "filter": ["--min-motion", "0.1"],  # a small object moving 0.45 px a frame scores ~0.5, under the default 1.0
}


def _log(message: str) -> None:
    print(f"[world] {message}", flush=True)


def needed(name: str, times: dict, done: Path) -> bool:
    """Whether step `name` must run: its output `done` is absent (else it is reused, and said so)."""
    if done.exists():
        _log(f"{name}: reused {done}")
        times.setdefault(name, "reused")
        return False
    return True


def records(stage_dir: Path) -> list[dict]:
    from data_tools.stage import read_jsonl

    return read_jsonl(stage_dir / "manifest.jsonl")


def attributes(clips: Path) -> dict:
    """The world's attribute rows by clip id (file stem)."""
    from data_tools.stage import read_jsonl

    return {Path(r["video"]).stem: r for r in read_jsonl(clips / "attributes.jsonl")}


def split_records(out: Path, split: str, limit: int | None = None) -> list[tuple[dict, dict]]:
    """(normalize record, world attributes) of the first `limit` normalized clips of `split`, in manifest order."""
    truth = attributes(out / "clips")
    return [(r, truth[r["id"]]) for r in records(out / "normalize") if truth[r["id"]]["split"] == split][:limit]


def split_frames(out: Path, split: str, limit: int | None = None):
    """uint8 frames [N, T, H, W, 3] of the normalized clips of `split`."""
    import numpy as np

    from data_tools.media import read_frames

    return np.stack([read_frames(r["path"]) for r, _ in split_records(out, split, limit)])


def build_data(out: Path, videos: int, seed: int, workers: int, times: dict) -> None:
    t = time.time()
    if needed("clips", times, out / "clips" / "attributes.jsonl"):
        data_tools("world", "--out", out / "clips", "--videos", videos, "--seed", seed)
        times["clips"] = round(time.time() - t, 1)
    t, previous = time.time(), out / "clips"
    for stage, flags in (("probe", []), ("select", RELAXED["select"]), ("filter", RELAXED["filter"]),
                         ("normalize", ["--format", "world", "--captions", out / "clips" / "captions.csv"])):
        if needed(stage, times, out / stage / "manifest.jsonl"):
            data_tools(stage, "--in", previous, "--out", out / stage, "--workers", workers, *flags)
            times[stage] = round(time.time() - t, 1)
            t = time.time()
        previous = out / stage


def build_vae(out: Path, steps: int, seed: int, times: dict) -> Path:
    from launch.world_vae import psnr, round_trip, to_model, train_vae

    folder = out / "vae"
    if not needed("vae", times, folder / "config.json"):
        return folder
    train, held = split_frames(out, "train"), split_frames(out, "test", 64)
    vae, summary = train_vae(train, held, steps, seed=seed)
    x = to_model(held)
    summary["test_psnr_64"] = round(psnr(round_trip(vae, x), x), 2)
    with atomic_path(folder, folder=True) as tmp:
        vae.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(summary, indent=1))
    times["vae"] = summary["seconds"]
    _log(f"vae: {summary['steps']} steps in {summary['seconds']} s, PSNR on 64 test clips {summary['test_psnr_64']} dB")
    return folder


def build_init(out: Path, seed: int, times: dict) -> Path:
    """The initial pipeline folder: the trained VAE, a random DiT (`world` preset), a tiny random umT5 over the
    world's words, the scheduler; the "random weights" model of the table."""
    folder = out / "init"
    if not needed("init", times, folder / "model_index.json"):
        return folder
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from megatron_wan.eval.world_vocab import WORDS
    from megatron_wan.models.wan21.adapter import config_to_diffusers
    from megatron_wan.models.wan21.config import preset
    from megatron_wan.models.wan21.tiny import tiny_text_encoder, tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(WORDS)
    cfg = preset("world")
    pipe = WanPipeline(transformer=WanTransformer3DModel(**config_to_diffusers(cfg)),
                       vae=AutoencoderKLWan.from_pretrained(out / "vae"),
                       text_encoder=tiny_text_encoder(tokenizer, cfg.text_dim).eval(), tokenizer=tokenizer,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         num_train_timesteps=1000, flow_shift=SHIFT))
    with atomic_path(folder, folder=True) as tmp:
        pipe.save_pretrained(tmp)
    return folder


def sft_pairs(out: Path) -> Path:
    """Pairs for the base's SFT (mode sft reads only the winner): every normalized clip paired with itself, in its
    world split."""
    from data_tools.stage import write_jsonl

    truth = attributes(out / "clips")
    pairs = [{"id": f"{r['id']}~self", "kind": "sft", "gt_id": r["id"], "prompt": r["prompt"], "image": r["image"],
              "split": truth[r["id"]]["split"], "winner": {"id": r["id"], "path": r["path"]},
              "loser": {"id": r["id"], "path": r["path"]}} for r in records(out / "normalize")]
    path = out / "sft_pairs.jsonl"
    write_jsonl(path, pairs)
    return path


def build_encoded(out: Path, init: Path, times: dict) -> Path:
    folder = out / "encoded"
    if needed("encode", times, folder / "manifest.json"):
        t = time.time()
        data_tools("encode", "--in", sft_pairs(out), "--out", folder, "--model", init)
        times["encode"] = round(time.time() - t, 1)
    return folder


def train_dit(out: Path, init: Path, encoded: Path, steps: int, times: dict, overrides=()) -> Path:
    """The DiT by this project's trainer: mode sft, full fine-tuning of the random init, 2 CPU ranks."""
    run = out / "dit"
    if needed("dit", times, out / "export" / "transformer" / "config.json"):
        t = time.time()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "megatron_wan.train", "--config", str(REPO / "configs" / "world-base-sft.yaml"),
               f"model.weights={init}", f"data.dir={encoded}", f"run.output_dir={run}", f"run.steps={steps}",
               f"run.save_every={steps}", *overrides]
        _log(" ".join(cmd[2:]))
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        from megatron_wan.export import main as export

        export([str(run), "--out", str(out / "export"), "--formats", "transformer", "--overwrite"])
        times["dit"] = round(time.time() - t, 1)
    return out / "export" / "transformer"


def build_base(out: Path, init: Path, transformer: Path, times: dict) -> Path:
    """OUT/base: the initial folder with the trained transformer."""
    folder = out / "base"
    if needed("base", times, folder / "model_index.json"):
        with atomic_path(folder) as tmp:
            shutil.copytree(init, tmp, ignore=shutil.ignore_patterns("transformer"))
            shutil.copytree(transformer, tmp / "transformer")
    return folder


def sample_groups(out: Path, models: dict, prompts: int, seeds: list[int], sampling=None) -> dict:
    """Sample the first `prompts` clips' captions of each split from each model (name -> (folder, transformer));
    returns {(split, name): samples.jsonl}."""
    from megatron_wan import parallel
    from megatron_wan.eval.world_samples import WorldSampling, sample_world

    parallel.initialize(1, 1)
    found = {}
    for split in ("train", "test"):
        rows = [truth for _, truth in split_records(out, split, prompts)]
        for name, (folder, transformer) in models.items():
            found[split, name] = sample_world(folder, rows, seeds, out / "eval" / split / name, transformer,
                                              sampling or WorldSampling())
    return found


def real_rows(out: Path, split: str, prompts: int) -> list[dict]:
    """The first `prompts` normalized clips of `split` as video rows (absolute paths) with their truth."""
    return [{**truth, "video": r["path"]} for r, truth in split_records(out, split, prompts)]


def reference_rows(out: Path, excluded: set) -> list[dict]:
    """The real `test` clips (absolute paths) whose ids are not in `excluded`: the reference set of the set-level
    distance, kept apart from the clips being scored."""
    return [{**r, "video": str(out / "clips" / r["video"])} for k, r in attributes(out / "clips").items()
            if r["split"] == "test" and k not in excluded]


def evaluate(out: Path, models: dict, prompts: int, seeds: list[int], sampling=None) -> dict:
    """World metrics of the real clips and of each model's samples, per split, side by side: OUT/summary.json and
    OUT/summary.md. The set-level distance is to the real `test` clips not among those scored."""
    from megatron_wan.eval.world import features, rank_groups, read_rows, score_videos, set_distance, summarize

    samples = sample_groups(out, models, prompts, seeds, sampling)
    reference, _ = score_videos(reference_rows(out, {Path(r["video"]).stem for r in real_rows(out, "test", prompts)}),
                                out)
    summaries = {}
    for split in ("train", "test"):
        groups = {"Real": score_videos(real_rows(out, split, prompts), out)}
        for name in models:
            path = samples[split, name]
            groups[name] = score_videos(read_rows(path), path.parent)
        for name, (scores, rejects) in groups.items():
            summary = summarize(scores, rejects)
            summary["distance"] = set_distance(features(scores), features(reference)) if scores else None
            summaries[split, name] = summary
    table = {f"{split}/{name}": s for (split, name), s in summaries.items()}
    ranks = {split: rank_groups({name: s for (sp, name), s in summaries.items() if sp == split})
             for split in ("train", "test")}
    return {"groups": table, "ranks": ranks, "prompts": prompts, "seeds": seeds,
            "reference_videos": len(reference)}


COLUMNS = (("accuracy", "all 3 right"), ("colour_accuracy", "colour"), ("shape_accuracy", "shape"),
           ("direction_accuracy", "direction"), ("speed", "speed px/f"), ("straightness", "straight"),
           ("area_cv", "area CV"), ("off_object_rms", "off-object"), ("grid_energy", "grid"),
           ("sharpness", "sharpness"), ("distance", "distance"))


def markdown_table(result: dict) -> str:
    """The evaluation as one markdown table: a row per split and group, the world metrics and Total_Score."""
    head = "| split | group | videos | " + " | ".join(h for _, h in COLUMNS) + " | Total_Score |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for key, s in result["groups"].items():
        split, name = key.split("/")
        values = " | ".join("-" if s.get(k) is None else f"{s[k]:.3f}" for k, _ in COLUMNS)
        lines.append(f"| {split} | {name} | {s['videos']} | {values} | {result['ranks'][split][name]['Total_Score']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/world", help="everything lands here; OUT/base is the model")
    parser.add_argument("--videos", type=int, default=1536, help="world clips (1/6 of them in the test split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dit-steps", type=int, default=600)
    parser.add_argument("--train-override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides of configs/world-base-sft.yaml for the DiT's training")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per split in the table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds per prompt")
    parser.add_argument("--until", choices=("data", "vae", "base"), help="stop after this step")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    times: dict = {}
    build_data(out, args.videos, args.seed, args.workers, times)
    if args.until == "data":
        return _log(f"times (s): {times}")
    build_vae(out, args.vae_steps, args.seed, times)
    if args.until == "vae":
        return _log(f"times (s): {times}")
    init = build_init(out, args.seed, times)
    transformer = train_dit(out, init, build_encoded(out, init, times), args.dit_steps, times,
                            args.train_override)
    base = build_base(out, init, transformer, times)
    if args.until == "base":
        return _log(f"times (s): {times}")
    t = time.time()
    result = evaluate(out, {"Random": (init, None), "Base": (base, None)}, args.prompts, args.seeds)
    times["table"] = round(time.time() - t, 1)
    result["times_s"] = times
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(result)
    (out / "summary.md").write_text(f"# The world's base model\n\n{args.prompts} prompts per split x seeds "
                                    f"{args.seeds}; Real = the normalized clips themselves.\n\n{table}\n"
                                    f"Wall time per step (s): {times}\n")
    print(table + f"[world] times (s): {times}\n[world] base model: {base}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
