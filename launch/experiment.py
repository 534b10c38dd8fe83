"""`python -m megatron_wan.eval experiment --out OUT [--quick]` (also python -m launch.experiment): issue 29's
experiment, the paper's groups trained from the world's base model on the same GT-Pairs and measured from pixels.

1. data: the world's clips through the data path (launch.world.build_data) into OUT/world; winners = the first
   --pairs normalized `train` clips (OUT/data/gt.jsonl), losers = the base's own generations of the same prompts
   (`data_tools generate --model BASE`, --generate-steps UniPC steps without guidance, as the evaluation samples);
   then `pair` (GT-Pairs, all of them `train`: the held-out prompts are the world's `test` combinations) and
   `encode`, as launch.demo does (generate writes the GT's own format, so no import-generated pass is needed). The
   sign check's pairs file (OUT/data/pairs_swapped.jsonl) is the encoded train.jsonl with winner and loser exchanged:
   the trainer reads it through data.pairs and swaps nothing itself. The pair-kind ablation's edited-GT losers (the
   winner's own frames reversed or shuffled) are written as videos and enter through `import-generated`, `pair` and
   `encode` into OUT/data/edited; the on-policy pairs are two generations of the base per prompt ranked by the world
   metrics (world_ranks, given to `pair --scores`) in OUT/data/onpolicy (PAIR_KINDS).
2. groups (GROUPS: name -> overrides of configs/world-regdpo.yaml): every trained group starts from the same base, on
   the same pairs, with the same steps, lr, batch and seeds (run.seed = the seed), trained by `torch.distributed.run
   -m megatron_wan.train` on 2 ranks into OUT/GROUP/seedK/run, a checkpoint every --save-every steps; Base is not
   trained (OUT/base/seed0/step_0).
3. every checkpoint exported (`megatron_wan.export --formats transformer`, LoRA merged) to
   OUT/GROUP/seedK/step_N/transformer, sampled (megatron_wan.eval.world_samples) on fixed prompts (--prompts distinct
   captions of the paired `train` clips and of the `test` clips) with fixed seeds (--sample-seeds) into
   OUT/GROUP/seedK/step_N/samples/*.mp4 + samples.jsonl, and scored by megatron_wan.eval.world, the set-level
   distance against the real `test` clips that are not among the prompts.
4. OUT/results.csv: one row per (group, seed, step, split), every metric and Total_Score (all checkpoints of a split
   ranked jointly); fig2_training_curves.png (the training metrics of each group's first seed, `eval curves`);
   fig7_{train,test}.png (Total_Score and each metric over steps, mean +- std over seeds, step 0 = Base);
   table10.md/.csv (each group's best checkpoint by mean `train` Total_Score, its `test` samples of all seeds pooled
   and ranked into the paper's points); sheets/GROUP.png (last step, first seed, the same prompts and seeds for
   every group); report.md (what held and what did not: a difference holds only when the means differ by more than
   the sum of the stds over seeds, and never from one seed).
Every step is reused when its output exists (delete a folder to redo it); each prints its wall time.

Sizes (any field can be changed by its flag):
  --quick   checks the machinery, not the conclusions; about 2 minutes on 2 busy CPU cores: 24 clips, 4 pairs, Base +
            Reg-DPO + its sign check, 1 seed, 2 steps of 2 pairs (1 per rank), 1 checkpoint, 2 prompts per split x 1
            sampling seed at 2 steps.
  default   not run yet: 480 clips, 160 pairs of each kind, all 16 groups, 3 seeds, 60 steps of 4 pairs (2 per
            rank) with a checkpoint every 30, 8 prompts per split (every held-out `test` combination) x 1 sampling
            seed at 10 steps. Sized to about 60 minutes on 2 CPU cores from unit times measured there (a trainer
            start ~15 s, a step ~0.2 s, a checkpoint's export + sampler load ~6 s, a world video sampled and decoded
            at 10 steps ~0.7 s): 45 runs x ~65 s plus ~8 minutes of data (480 generated videos); a busier machine
            takes longer, and `--groups` runs a subset.
"""

import argparse
import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from launch.world import SHIFT, attributes, build_data, data_tools, needed, records, reference_rows, split_records
from megatron_wan.eval.world_vocab import FPS, FRAMES

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "world-regdpo.yaml"
LOW_BETA = 100  # the "one lower beta" of the issue; the recipe's is 500
FULL = ("run.finetune=full", "lora=null")


def _log(message: str) -> None:
    print(f"[experiment] {message}", flush=True)


@dataclass(frozen=True)
class Group:
    """A group of the experiment: overrides of the recipe (configs/world-regdpo.yaml), nothing else differs."""

    label: str
    overrides: tuple[str, ...] = ()
    pairs: str = "gt"  # PAIR_KINDS: which pairs it trains on
    trained: bool = True  # Base is not


GROUPS = {  # folder name -> group; the one place the groups differ
    "base": Group("Base", trained=False),
    "sft": Group("SFT", ("objective.mode=sft",)),
    "dpo": Group("DPO", ("objective.mode=dpo",)),
    "regdpo": Group("Reg-DPO (r = DGR)"),
    "regdpo-r25": Group("Reg-DPO (r = 25)", ("objective.sft_weight=25",)),
    "regdpo-r-half": Group("Reg-DPO (r = DGR/2)", ("objective.sft_weight=dgr/2",)),
    "regdpo-r-double": Group("Reg-DPO (r = DGR x 2)", ("objective.sft_weight=dgr*2",)),
    f"dpo-beta{LOW_BETA}": Group(f"DPO (beta {LOW_BETA})", ("objective.mode=dpo", f"objective.beta={LOW_BETA}")),
    f"regdpo-beta{LOW_BETA}": Group(f"Reg-DPO (beta {LOW_BETA})", (f"objective.beta={LOW_BETA}",)),
    "sft-full": Group("SFT, full", (*FULL, "objective.mode=sft")),
    "dpo-full": Group("DPO, full", (*FULL, "objective.mode=dpo", "objective.reference=copy")),
    "regdpo-full": Group("Reg-DPO, full", (*FULL, "objective.reference=copy")),
    "regdpo-swap": Group("Reg-DPO, winner and loser swapped", pairs="swapped"),
    "regdpo-edited": Group("Reg-DPO, edited-GT losers", pairs="edited"),
    "dpo-edited": Group("DPO, edited-GT losers", ("objective.mode=dpo",), pairs="edited"),
    "regdpo-onpolicy": Group("Reg-DPO, on-policy pairs", pairs="onpolicy"),
}
PAIR_KINDS = {  # a group's `pairs` -> what they are
    "gt": "GT-Pairs: the real clip wins over the base's generation of its prompt",
    "swapped": "the GT-Pairs with winner and loser exchanged in the pairs file (the sign check)",
    "edited": "edited-GT: the real clip wins over its own frames reversed (even pairs) or shuffled (odd pairs)",
    "onpolicy": "on-policy: two generations of the base per prompt, the one the world metrics rank higher wins",
}


@dataclass(frozen=True)
class Size:
    """How big a run is; every field is also a flag (--pairs, --save-every, ...)."""

    videos: int  # world clips (1/6 of them `test`)
    pairs: int  # GT-Pairs (one generated loser per `train` clip)
    generate_steps: int  # UniPC steps of the losers
    groups: tuple[str, ...]
    seeds: tuple[int, ...]  # training seeds (run.seed), the same for every group
    steps: int
    save_every: int
    batch: int  # pairs per rank and step (run.batch_size; 2 ranks)
    lr: float
    prompts: int  # distinct captions sampled per split at every checkpoint
    sample_seeds: tuple[int, ...]
    sample_steps: int


DEFAULT = Size(videos=480, pairs=160, generate_steps=10, groups=tuple(GROUPS), seeds=(1, 2, 3), steps=60,
               save_every=30, batch=2, lr=5e-4, prompts=8, sample_seeds=(0,), sample_steps=10)
QUICK = Size(videos=24, pairs=4, generate_steps=2, groups=("base", "regdpo", "regdpo-swap"), seeds=(1,), steps=2,
             save_every=2, batch=1, lr=5e-4, prompts=2, sample_seeds=(0,), sample_steps=2)


# 1. data ------------------------------------------------------------------------------------------------------------

def run_stages(stages, times: dict) -> None:
    """(name, done, argv) each: `python -m data_tools *argv` in this process unless its output `done` exists."""
    for name, done, argv in stages:
        if needed(name, times, done):
            t = time.time()
            data_tools(*argv)
            times[name] = round(time.time() - t, 1)


def build_pairs(out: Path, base: Path, size: Size, world_seed: int, times: dict) -> dict:
    """The world's clips through the data path, then the pairs of each kind the groups need (PAIR_KINDS); returns
    kind -> (encoded folder, pairs file) for the trainer's data.dir and data.pairs."""
    world, data = out / "world", out / "data"
    build_data(world, size.videos, world_seed, 1, times)
    truth = attributes(world / "clips")
    gts = [r for r, _ in split_records(world, "train", size.pairs)]
    if len(gts) < size.pairs:
        raise ValueError(f"{world / 'normalize'}: {len(gts)} normalized `train` clips, --pairs asks for {size.pairs}")
    from data_tools.stage import read_jsonl, write_jsonl

    data.mkdir(parents=True, exist_ok=True)
    if not (data / "gt.jsonl").exists():
        write_jsonl(data / "gt.jsonl", gts)
    kinds = {GROUPS[n].pairs for n in size.groups if GROUPS[n].trained}

    def generate(folder: Path, name: str, samples: int) -> tuple:
        return (f"{name} generate".strip(), folder / "generated" / "manifest.jsonl",
                ["generate", "--in", data / "gt.jsonl", "--out", folder / "generated", "--model", base, "--task",
                 "t2v", "--generator", name or "base", "--samples", samples, "--steps", size.generate_steps,
                 "--shift", SHIFT, "--guidance-scale", 1])

    def pair_and_encode(folder: Path, name: str, *flags, kind: str = "gt") -> list[dict]:
        """pair + encode into FOLDER; the encoded pairs of `kind` (gt: GT-Pairs, annotated: ranked pairs)."""
        run_stages([(f"{name} pair".strip(), folder / "pairs" / "manifest.jsonl",
                     ["pair", "--in", data / "gt.jsonl", "--generated", folder / "generated", "--out",
                      folder / "pairs", "--test-fraction", 0, *flags]),
                    (f"{name} encode".strip(), folder / "encoded" / "manifest.json",
                     ["encode", "--in", folder / "pairs", "--out", folder / "encoded", "--model", base, "--task",
                      "t2v"])], times)
        pairs = [p for p in read_jsonl(folder / "encoded" / "train.jsonl") if p["kind"] == kind]
        if len(pairs) != size.pairs:
            raise ValueError(f"{folder / 'encoded' / 'train.jsonl'}: {len(pairs)} encoded {name or 'GT'} pairs, "
                             f"expected {size.pairs} (see the rejects of {folder}/generated, pairs and encoded)")
        return pairs

    found = {}
    if kinds & {"gt", "swapped"}:
        run_stages([generate(data, "", 1)], times)
        pairs = pair_and_encode(data, "")
        write_jsonl(data / "pairs_swapped.jsonl", swapped(pairs))
        found["gt"] = (data / "encoded", data / "encoded" / "train.jsonl")
        found["swapped"] = (data / "encoded", data / "pairs_swapped.jsonl")
    if "edited" in kinds:
        folder = data / "edited"
        edited_videos(folder, gts)
        run_stages([("edited import-generated", folder / "generated" / "manifest.jsonl",
                     ["import-generated", "--in", folder / "raw", "--out", folder / "generated", "--mapping",
                      folder / "mapping.csv", "--gt", data / "gt.jsonl", "--fps", FPS, "--frames", FRAMES])], times)
        pair_and_encode(folder, "edited")
        found["edited"] = (folder / "encoded", folder / "encoded" / "train.jsonl")
    if "onpolicy" in kinds:
        folder = data / "onpolicy"
        run_stages([generate(folder, "onpolicy", 2)], times)
        world_ranks(folder, truth)
        write_jsonl(folder / "onpolicy.jsonl", pair_and_encode(folder, "onpolicy", "--scores", folder / "scores.csv",
                                                                 kind="annotated"))
        found["onpolicy"] = (folder / "encoded", folder / "onpolicy.jsonl")
    return found


def world_ranks(folder: Path, truth: dict) -> None:
    """FOLDER/scores.csv for `pair --scores`: of the generated videos of each GT, the one the world metrics rank
    higher (more of colour, shape and direction right, then less energy off the object) scores 5, the other 1."""
    from data_tools.stage import read_jsonl
    from megatron_wan.eval.world import score_videos

    by_gt = {}
    for r in read_jsonl(folder / "generated" / "manifest.jsonl"):
        by_gt.setdefault(r["gt_id"], []).append(r)
    rows = ["video,annotator,dimension,score"]
    for gt_id, videos in by_gt.items():
        scores, rejects = score_videos([{**truth[gt_id], "video": v["path"]} for v in videos], "/")
        if rejects:
            raise ValueError(f"{folder / 'generated'}: {rejects[0]['video']}: {rejects[0]['reason']}")
        keys = [(sum(s[f"{k}_ok"] for k in ("colour", "shape", "direction")), -s["off_object_rms"]) for s in scores]
        best = max(range(len(videos)), key=keys.__getitem__)
        rows += [f"{v['id']},world,rank,{5 if i == best else 1}" for i, v in enumerate(videos)]
    (folder / "scores.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def edited_videos(folder: Path, gts: list[dict]) -> None:
    """FOLDER/raw: each GT clip's own frames reversed (even index) or shuffled (odd index, seeded by it), named
    GT.reversed / GT.shuffled, and FOLDER/mapping.csv (video, gt_id, generator) for import-generated."""
    import numpy as np

    from data_tools.media import read_frames
    from data_tools.world import CRF
    from megatron_wan.files import atomic_path
    from megatron_wan.video_io import encode_h264

    (folder / "raw").mkdir(parents=True, exist_ok=True)
    rows = ["video,gt_id,generator"]
    for i, gt in enumerate(gts):
        edit = "reversed" if i % 2 == 0 else "shuffled"
        name, path = f"{gt['id']}.{edit}", folder / "raw" / f"{gt['id']}.{edit}.mp4"
        if not path.exists():
            frames = read_frames(gt["path"])
            order = (np.arange(len(frames))[::-1] if edit == "reversed"
                     else np.random.default_rng(i).permutation(len(frames)))
            with atomic_path(path) as tmp:
                encode_h264(tmp, frames[order], FPS, CRF, "medium", threads=1)
        rows.append(f"{name}.mp4,{gt['id']},{edit}")
    (folder / "mapping.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def swapped(pairs: list[dict]) -> list[dict]:
    """The pairs with winner and loser exchanged (the sign check's data), ids marked `~swapped`."""
    return [{**p, "id": f"{p['id']}~swapped", "winner": p["loser"], "loser": p["winner"]} for p in pairs]


def eval_rows(out: Path, size: Size) -> list[dict]:
    """The fixed prompts: the world's attribute rows of the first `size.prompts` distinct captions among the paired
    `train` clips, then among the `test` clips; an error when a split has fewer."""
    from data_tools.stage import read_jsonl

    truth = attributes(out / "world" / "clips")
    normalized = [truth[r["id"]] for r in records(out / "world" / "normalize")]
    pools = {"train": [truth[r["id"]] for r in read_jsonl(out / "data" / "gt.jsonl")],
             "test": [r for r in normalized if r["split"] == "test"]}
    rows = []
    for split, pool in pools.items():
        distinct = list({r["caption"]: r for r in reversed(pool)}.values())[::-1][:size.prompts]
        if len(distinct) < size.prompts:
            raise ValueError(f"{out / 'world'}: {len(distinct)} distinct `{split}` captions, --prompts asks for "
                             f"{size.prompts}")
        rows += distinct
    return rows


# 2. training --------------------------------------------------------------------------------------------------------

def train(out: Path, base: Path, data: dict, name: str, seed: int, size: Size, times: dict) -> Path:
    """One group, one seed, by the project's trainer on 2 ranks: OUT/GROUP/seedK/run (data: build_pairs')."""
    group, run = GROUPS[name], out / name / f"seed{seed}" / "run"
    if needed(f"train {name} seed {seed}", times, run / "summary.json"):
        t = time.time()
        encoded, pairs = data[group.pairs]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "megatron_wan.train", "--config", str(RECIPE), f"model.weights={base}", f"data.dir={encoded}",
               f"data.pairs={pairs}", f"run.output_dir={run}", f"run.steps={size.steps}",
               f"run.save_every={size.save_every}", f"run.keep_last={size.steps // size.save_every + 1}",
               f"run.batch_size={size.batch}", f"optim.lr={size.lr}", f"run.seed={seed}", *group.overrides]
        _log(" ".join(cmd[2:]))
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        times[f"train {name} seed {seed}"] = round(time.time() - t, 1)
    return run


def checkpoints(run: Path) -> dict[int, Path]:
    """step -> checkpoint folder of a run."""
    from megatron_wan.export import find_checkpoint

    found = {}
    for folder in sorted((run / "checkpoints").glob("step_*")):
        if folder.is_dir():
            found[int(folder.name.split("_")[1])] = find_checkpoint(folder)
    if not found:
        raise FileNotFoundError(f"{run / 'checkpoints'}: no checkpoint")
    return found


# 3. samples and scores ----------------------------------------------------------------------------------------------

def sample_checkpoint(folder: Path, base: Path, checkpoint: Path | None, rows: list[dict], size: Size) -> Path:
    """Export `checkpoint` (None: the base itself) to FOLDER/transformer and sample the fixed prompts into FOLDER;
    returns FOLDER/samples.jsonl."""
    from megatron_wan.eval.world_samples import WorldSampling, sample_world
    from megatron_wan.export import main as export

    transformer = None
    if checkpoint is not None:
        transformer = folder / "transformer"
        if not (transformer / "config.json").exists():
            export([str(checkpoint), "--out", str(folder), "--formats", "transformer"])
    if (folder / "samples.jsonl").exists():
        return folder / "samples.jsonl"
    return sample_world(base, rows, list(size.sample_seeds), folder, transformer,
                        WorldSampling(steps=size.sample_steps, shift=SHIFT))


def reference_features(out: Path, rows: list[dict]):
    """The FEATURES of the real `test` clips that are not among the prompts `rows`: the set-level distance's
    reference."""
    from megatron_wan.eval.world import features, score_videos

    excluded = {Path(r["video"]).stem for r in rows if r["split"] == "test"}
    reference, _ = score_videos(reference_rows(out / "world", excluded), out)
    if not reference:
        raise ValueError(f"{out / 'world'}: no real `test` clip left for the distance besides the {len(excluded)} "
                         f"prompts (more --videos, or fewer --prompts)")
    return features(reference)


def summary_of(scores: list[dict], rejects: list[dict], reference) -> dict:
    """The world summary of scored videos with their set-level `distance` to `reference`."""
    from megatron_wan.eval.world import features, set_distance, summarize

    summary = summarize(scores, rejects)
    summary["distance"] = set_distance(features(scores), reference) if scores else None
    return summary


def score(samples: Path, reference) -> dict:
    """split -> world summary of one checkpoint's samples."""
    from megatron_wan.eval.world import read_rows, score_videos

    rows = read_rows(samples)
    return {split: summary_of(*score_videos([r for r in rows if r["split"] == split], samples.parent), reference)
            for split in ("train", "test")}


def evaluate_all(out: Path, base: Path, runs: dict, rows: list[dict], reference, size: Size, times: dict) -> dict:
    """(group, seed, step) -> split -> summary for Base and every checkpoint of every run (runs: (group, seed) ->
    run folder)."""
    from megatron_wan import parallel

    parallel.initialize(1, 1)
    t = time.time()
    units = {("base", 0, 0): (out / "base" / "seed0" / "step_0", None)}
    for (name, seed), run in runs.items():
        for step, checkpoint in checkpoints(run).items():
            units[name, seed, step] = (out / name / f"seed{seed}" / f"step_{step}", checkpoint)
    results = {}
    for key, (folder, checkpoint) in units.items():
        results[key] = score(sample_checkpoint(folder, base, checkpoint, rows, size), reference)
        _log(f"{key[0]} seed {key[1]} step {key[2]}: test accuracy {results[key]['test']['accuracy']:.3f}")
    times["sample + score"] = round(time.time() - t, 1)
    return results


# 4. tables, figures, report -----------------------------------------------------------------------------------------

METRICS = {  # results.csv's metric columns (world summary keys) -> title in figures and the report
    "accuracy": "all 3 right", "colour_accuracy": "colour", "shape_accuracy": "shape",
    "direction_accuracy": "direction", "object_frames": "object frames", "speed": "speed px/f",
    "straightness": "straightness", "area_cv": "area CV", "colour_std": "colour std",
    "off_object_rms": "off-object RMS", "sharpness": "sharpness", "grid_energy": "grid energy",
    "distance": "distance to real"}


def with_totals(results: dict) -> dict:
    """results with each summary's Total_Score: per split, every (group, seed, step) ranked jointly."""
    from megatron_wan.eval.ranking import TOTAL
    from megatron_wan.eval.world import rank_groups

    for split in ("train", "test"):
        ranked = rank_groups({key: s[split] for key, s in results.items()})
        for key, s in results.items():
            s[split][TOTAL] = ranked[key][TOTAL]
    return results


def write_results(path: Path, results: dict) -> None:
    from megatron_wan.eval.ranking import TOTAL

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "seed", "step", "split", "videos", "rejected", *METRICS, TOTAL])
        for (name, seed, step), splits in sorted(results.items()):
            for split, s in splits.items():
                writer.writerow([name, seed, step, split, s["videos"], s["rejected"],
                                 *("" if s.get(k) is None else f"{s[k]:.6g}" for k in METRICS), s[TOTAL]])


def stat(values: list) -> tuple[float, float, int]:
    """(mean, std over seeds (population), count) of the numbers among `values`."""
    import numpy as np

    values = [float(v) for v in values if v is not None]
    return (float(np.mean(values)), float(np.std(values)), len(values)) if values else (float("nan"), 0.0, 0)


def by_step(results: dict, name: str, split: str, key: str) -> dict[int, tuple]:
    """step -> stat over seeds of summary `key` of group `name` (Base's value at step 0 for every group)."""
    steps = {0: [results["base", 0, 0][split].get(key)]}
    for (group, _, step), s in results.items():
        if group == name and step:
            steps.setdefault(step, []).append(s[split].get(key))
    return {step: stat(values) for step, values in sorted(steps.items())}


def fmt(st: tuple) -> str:
    mean, std, n = st
    return f"{mean:.3f} +- {std:.3f}" if n > 1 else f"{mean:.3f}"


def compare(a: tuple, b: tuple, higher: bool = True) -> str:
    """'better', 'worse' (mean differs by more than the sum of the stds) or why no claim."""
    if a[2] < 2:
        return "one seed: no claim"
    diff = (a[0] - b[0]) * (1 if higher else -1)
    if abs(a[0] - b[0]) <= a[1] + b[1]:
        return "within the spread"
    return "better" if diff > 0 else "worse"


def plot_figures(out: Path, results: dict, runs: dict, size: Size) -> list[Path]:
    from megatron_wan.eval.curves import plot_checkpoint_metrics, plot_training
    from megatron_wan.eval.ranking import TOTAL

    trained = [n for n in size.groups if GROUPS[n].trained]
    written = []
    if trained:
        written.append(plot_training({GROUPS[n].label: runs[n, size.seeds[0]] / "metrics.jsonl" for n in trained},
                                     out / "fig2_training_curves.png"))
    for split in ("train", "test"):
        titles = {TOTAL: f"{TOTAL} ({split})", **{k: f"{v} ({split})" for k, v in METRICS.items()}}
        series = {k: {GROUPS[n].label: [(step, *st[:2]) for step, st in by_step(results, n, split, k).items()]
                      for n in trained} for k in titles}
        written.append(plot_checkpoint_metrics(series, titles, out / f"fig7_{split}.png"))
    return written


def best_checkpoints(out: Path, results: dict, reference, size: Size) -> tuple[dict, str]:
    """group -> best step (by mean `train` Total_Score over seeds; Base: 0), and the Table 10 analogue: each group's
    best checkpoint, its `test` samples of all seeds pooled, ranked (table10.md, table10.csv)."""
    from megatron_wan.eval.ranking import TOTAL, report
    from megatron_wan.eval.world import ranking_values, read_rows, score_videos

    best, pooled = {}, {}
    for name in size.groups:
        steps = by_step(results, name, "train", TOTAL)
        best[name] = max((s for s in steps if s or not GROUPS[name].trained), key=lambda s: steps[s][0])
        seeds = sorted({seed for (g, seed, step) in results if g == name and step == best[name]})
        scores, rejects = [], []
        for seed in seeds:
            folder = out / name / f"seed{seed}" / f"step_{best[name]}"
            found = score_videos([r for r in read_rows(folder / "samples.jsonl") if r["split"] == "test"], folder)
            scores, rejects = scores + found[0], rejects + found[1]
        pooled[f"{GROUPS[name].label} @ {best[name]}"] = summary_of(scores, rejects, reference)
    return best, report(ranking_values(pooled), out / "table10", base="Base @ 0")


def contact_sheets(out: Path, results: dict, size: Size) -> dict[str, Path]:
    """sheets/GROUP.png: each group's last step (first seed), a row per sample in samples.jsonl's order (the same
    prompts and seeds for every group)."""
    from PIL import Image

    from megatron_wan.eval.world import read_rows
    from megatron_wan.train_samples import contact_sheet
    from megatron_wan.video_io import read_rgb

    sheets = {}
    for name in size.groups:
        seed = size.seeds[0] if GROUPS[name].trained else 0
        step = max(st for (g, sd, st) in results if g == name and sd == seed)
        folder = out / name / f"seed{seed}" / f"step_{step}"
        videos = [read_rgb(folder / r["path"]) for r in read_rows(folder / "samples.jsonl")]
        path = out / "sheets" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(contact_sheet(videos)).save(path)
        sheets[name] = path
    return sheets


def dpo_dynamics(run: Path) -> dict:
    """Fig. 2's quantities of one run's metrics.jsonl: metric -> (mean of the first fifth of steps, of the last)."""
    from megatron_wan.eval.curves import read_log

    log = read_log(run / "metrics.jsonl")
    ends = {}
    for key in ("s", "dgr", "win_gap", "lose_gap", "loss_dpo"):
        values = [v for _, v in log.get(key, [])]
        if values:
            k = max(1, len(values) // 5)
            ends[key] = (sum(values[:k]) / k, sum(values[-k:]) / k)
    return ends


COLLAPSE = 2.0  # grid energy at this multiple of Base's: "collapsed"
DGR_ZERO = 0.1  # DGR at the end under this fraction of its start: "tends to 0"


def claims(results: dict, runs: dict, size: Size) -> list[str]:
    """The report's statements, each computed from the results and stated whether it holds or not."""
    from megatron_wan.eval.ranking import TOTAL

    present = set(size.groups)
    last = {n: max(by_step(results, n, "test", TOTAL)) for n in present}

    def at_last(name, key, split="test"):
        return by_step(results, name, split, key)[last[name]]

    lines = []
    for a, b in (("regdpo", "base"), ("regdpo", "sft"), ("regdpo", "dpo"), ("sft", "base"), ("dpo", "base"),
                 ("regdpo-full", "sft-full"), ("regdpo-full", "dpo-full"), ("regdpo", "regdpo-edited"),
                 ("dpo", "dpo-edited"), ("regdpo", "regdpo-onpolicy")):
        if {a, b} <= present:
            for key, higher in ((TOTAL, True), ("accuracy", True), ("distance", False)):
                x, y = at_last(a, key), at_last(b, key)
                lines.append(f"{GROUPS[a].label} vs {GROUPS[b].label}, test {key} at the last step: {fmt(x)} vs "
                             f"{fmt(y)}: {compare(x, y, higher)}.")
    base_grid = results["base", 0, 0]["test"]["grid_energy"]
    for name in [n for n in size.groups if GROUPS[n].trained]:
        grid = by_step(results, name, "test", "grid_energy")
        collapsed = [s for s, st in grid.items() if s and st[0] > COLLAPSE * base_grid]
        worst = max(st[0] for s, st in grid.items() if s) / base_grid if base_grid else float("inf")
        lines.append(f"{GROUPS[name].label} collapsed at step {collapsed[0]}: grid energy x{worst:.1f} of Base's."
                     if collapsed else f"{GROUPS[name].label}: no collapse (grid energy at most x{worst:.2f} of "
                                       f"Base's; collapse = x{COLLAPSE:g}).")
    if "dpo" in present:
        for seed in size.seeds:
            e = dpo_dynamics(runs["dpo", seed])
            if not {"s", "dgr", "win_gap", "lose_gap"} <= set(e):
                lines.append(f"DPO seed {seed}: its log lacks Fig. 2's metrics.")
                continue
            held = {"s falls": e["s"][1] < e["s"][0], f"DGR tends to 0 (< {DGR_ZERO:g} of its start)":
                    e["dgr"][1] < DGR_ZERO * e["dgr"][0], "win gap rises": e["win_gap"][1] > e["win_gap"][0],
                    "lose gap rises": e["lose_gap"][1] > e["lose_gap"][0]}
            shown = ", ".join(f"{k} ({'holds' if v else 'does not hold'})" for k, v in held.items())
            lines.append(f"DPO seed {seed}, Fig. 2 dynamics (first fifth -> last fifth of steps: s {e['s'][0]:.3g} -> "
                         f"{e['s'][1]:.3g}, DGR {e['dgr'][0]:.3g} -> {e['dgr'][1]:.3g}, win gap "
                         f"{e['win_gap'][0]:.3g} -> {e['win_gap'][1]:.3g}, lose gap {e['lose_gap'][0]:.3g} -> "
                         f"{e['lose_gap'][1]:.3g}): {shown}.")
    if {"regdpo", "regdpo-swap"} <= present:
        for key, higher in (("accuracy", True), ("distance", False), (TOTAL, True)):
            base = at_last("base", key)
            moves = {n: compare(at_last(n, key), base, higher) for n in ("regdpo", "regdpo-swap")}
            opposite = {moves["regdpo"], moves["regdpo-swap"]} == {"better", "worse"}
            lines.append(f"Sign check, test {key} against Base ({fmt(base)}): Reg-DPO {fmt(at_last('regdpo', key))} "
                         f"({moves['regdpo']}), swapped {fmt(at_last('regdpo-swap', key))} ({moves['regdpo-swap']}): "
                         f"{'the metrics move the other way' if opposite else 'no opposite move shown'}.")
    if "regdpo" in present and len(by_step(results, "regdpo", "test", TOTAL)) > 2:
        totals = by_step(results, "regdpo", "train", TOTAL)
        steps = [s for s in totals if s]
        rising = all(totals[b][0] >= totals[a][0] for a, b in zip(steps, steps[1:]))
        lines.append(f"Reg-DPO keeps improving (train Total_Score mean never falls from a checkpoint to the next: "
                     f"{', '.join(f'{s}: {totals[s][0]:.1f}' for s in steps)}): "
                     f"{'holds' if rising else 'does not hold'}.")
    return lines


def write_report(out: Path, results: dict, runs: dict, size: Size, base: Path, table10: str, best: dict,
                 sheets: dict, figures: list[Path], times: dict) -> Path:
    from megatron_wan.eval.ranking import TOTAL

    seeds_note = ("one training seed: no difference is claimed" if len(size.seeds) < 2 else
                  f"{len(size.seeds)} training seeds; mean +- std (population) over them")
    lines = ["# Does Reg-DPO make the model better? (the world)", "",
             f"Base: `{base}`. GT-Pairs: {size.pairs} world `train` clips (winners) against the base's own "
             f"generations ({size.generate_steps} UniPC steps) of the same prompts. Every group: "
             f"`configs/{RECIPE.name}` with its overrides, {size.steps} steps of {2 * size.batch} pairs (2 ranks), lr "
             f"{size.lr:g}, "
             f"a checkpoint every {size.save_every} steps, seeds {list(size.seeds)} ({seeds_note}). Every checkpoint "
             f"sampled on {size.prompts} `train` and {size.prompts} `test` prompts x sampling seeds "
             f"{list(size.sample_seeds)} ({size.sample_steps} steps) and scored from pixels (megatron_wan.eval.world).",
             "", "A difference holds only when the two means differ by more than the sum of their stds over seeds. "
             "Nothing was tuned for any group.", "", "## Groups", "", "| group | overrides | pairs |", "|---|---|---|"]
    lines += [f"| {g.label} (`{n}`) | {' '.join(f'`{o}`' for o in g.overrides) or '-'} | "
              f"{PAIR_KINDS[g.pairs] if g.trained else 'not trained'} |"
              for n, g in GROUPS.items() if n in size.groups]
    lines += ["", "## What held and what did not", ""] + [f"- {c}" for c in claims(results, runs, size)]
    keys = (TOTAL, "accuracy", "grid_energy", "distance")
    for split in ("test", "train"):
        lines += ["", f"## Last step, `{split}` prompts", "",
                  "| group | step | " + " | ".join(METRICS.get(k, k) for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for name in size.groups:
            table = {k: by_step(results, name, split, k) for k in keys}
            step = max(table[TOTAL])
            lines.append(f"| {GROUPS[name].label} | {step} | " + " | ".join(fmt(table[k][step]) for k in keys) + " |")
    lines += ["", "## Table 10 analogue: each group's best checkpoint", "",
              "Best = the step with the highest mean `train` Total_Score; ranked on its `test` samples of all seeds "
              "pooled (points per dimension, arrows against Base).", "", table10, "",
              "## Figures", "", *(f"![{p.stem}]({p.name})" for p in figures), "",
              "## Contact sheets at the last step (first seed)", "",
              "One row per sample, in samples.jsonl's order (the same prompts and seeds in every sheet).", ""]
    lines += [f"{GROUPS[n].label}:\n\n![{n}](sheets/{p.name})\n" for n, p in sheets.items()]
    lines += ["", f"Best steps: {best}", "", f"Wall time per step (s): {times}", "",
              "Files: `results.csv` (every group, seed, step, split, metric and Total_Score), "
              "`GROUP/seedK/step_N/samples.jsonl` + `samples/*.mp4` (rescore with `python -m megatron_wan.eval "
              "world`), `GROUP/seedK/run/metrics.jsonl` (training metrics), `data/` (the pairs).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", type=Path, required=True, help="everything lands here")
    parser.add_argument("--quick", action="store_true", help="the tiny size (QUICK), checking the machinery")
    parser.add_argument("--base", type=Path, default=REPO / "assets" / "world" / "base",
                        help="the world's base model, a diffusers WanPipeline folder (make world)")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the world's clips")
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), help="default: every group (quick: 3)")
    for f in fields(Size):
        if f.name == "groups":
            continue
        multiple = f.type == tuple[int, ...]
        parser.add_argument("--" + f.name.replace("_", "-"), type=float if f.name == "lr" else int,
                            nargs="+" if multiple else None,
                            help=f"default {getattr(DEFAULT, f.name)}, quick {getattr(QUICK, f.name)}")


def size_of(args) -> Size:
    """QUICK or DEFAULT with the flags given; every group needs Base."""
    given = {f.name: getattr(args, f.name) for f in fields(Size) if getattr(args, f.name, None) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    size = replace(QUICK if args.quick else DEFAULT, **given)
    if "base" not in size.groups:
        size = replace(size, groups=("base", *size.groups))
    if size.steps % size.save_every:
        raise ValueError(f"--steps {size.steps} is not a multiple of --save-every {size.save_every}")
    if 2 * size.batch > size.pairs:
        raise ValueError(f"--batch {size.batch} per rank x 2 ranks is more than the {size.pairs} pairs")
    return size


def run(args) -> Path:
    size = size_of(args)
    out, base = args.out.resolve(), args.base.resolve()
    if not (base / "model_index.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a pipeline folder (no model_index.json); build it with "
                                f"`make world` or pass another")
    out.mkdir(parents=True, exist_ok=True)
    _log(f"{out}: {size}")
    started, times = time.time(), {}
    data = build_pairs(out, base, size, args.world_seed, times)
    rows = eval_rows(out, size)
    runs = {(n, seed): train(out, base, data, n, seed, size, times)
            for n in size.groups if GROUPS[n].trained for seed in size.seeds}
    reference = reference_features(out, rows)
    results = with_totals(evaluate_all(out, base, runs, rows, reference, size, times))
    write_results(out / "results.csv", results)
    figures = plot_figures(out, results, runs, size)
    best, table10 = best_checkpoints(out, results, reference, size)
    sheets = contact_sheets(out, results, size)
    times["total"] = round(time.time() - started, 1)
    path = write_report(out, results, runs, size, base, table10, best, sheets, figures, times)
    _log(f"done in {times['total']} s: {path}")
    return path


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m launch.experiment")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
