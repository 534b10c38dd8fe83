"""Issue 29's experiment (launch.experiment, `python -m megatron_wan.eval experiment`): --quick runs the whole
machinery end to end from a random world base (the real one is assets/world/base), the sign check's swap reaches
the trainer, the edited-GT losers are the winners' own frames reversed or shuffled, and the on-policy pairs are the
base's own generations in the world metrics' order."""

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from launch.experiment import GROUPS, METRICS, compare


def random_base(tmp_path: Path) -> Path:
    """A world pipeline folder with random weights (a random VAE of the world's config), as `make world`'s init."""
    from diffusers import AutoencoderKLWan

    from launch.world import build_init
    from launch.world_vae import VAE_CONFIG

    AutoencoderKLWan(**VAE_CONFIG).save_pretrained(tmp_path / "vae")
    return build_init(tmp_path, 0, {})


def test_quick_runs_every_step_and_swaps_only_the_pairs_file(tmp_path):
    from megatron_wan.eval.__main__ import main
    from megatron_wan.eval.world import score_videos

    out = tmp_path / "exp"
    groups = ("regdpo", "regdpo-swap", "regdpo-edited", "regdpo-onpolicy")
    report = main(["experiment", "--out", str(out), "--quick", "--base", str(random_base(tmp_path)), "--groups",
                   *groups])
    assert report == out.resolve() / "report.md"

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["group"], r["seed"], r["step"], r["split"]) for r in rows} == {
        (g, s, n, split) for g, s, n in (("base", "0", "0"), *((g, "1", "2") for g in groups))
        for split in ("train", "test")}
    for r in rows:
        assert r["videos"] == "2" and r["Total_Score"] and all(r[k] != "" for k in ("accuracy", "distance")), r
        assert set(METRICS) <= set(r)

    samples = [json.loads(line) for line in (out / "regdpo" / "seed1" / "step_2" / "samples.jsonl").open()]
    assert [(s["split"], s["seed"]) for s in samples] == [("train", 0)] * 2 + [("test", 0)] * 2
    assert all({"path", "caption", "shape", "colour", "direction"} <= set(s) for s in samples)
    assert all((out / "regdpo" / "seed1" / "step_2" / s["path"]).is_file() for s in samples)
    base = [json.loads(line) for line in (out / "base" / "seed0" / "step_0" / "samples.jsonl").open()]
    assert [s["caption"] for s in base] == [s["caption"] for s in samples]  # the same fixed prompts for every group

    # the sign check: the trainer read the swapped file, and saw each pair's winner as the other run's loser under
    # the same noise and timestep (the reference errors of step 1 are the base's, before any update)
    pairs = [json.loads(line) for line in (out / "data" / "encoded" / "train.jsonl").open()]
    swapped = [json.loads(line) for line in (out / "data" / "pairs_swapped.jsonl").open()]
    assert [(p["winner"], p["loser"]) for p in pairs] == [(p["loser"], p["winner"]) for p in swapped]
    assert "pairs_swapped.jsonl" in (out / "regdpo-swap" / "seed1" / "run" / "config.yaml").read_text()
    first = {g: json.loads((out / g / "seed1" / "run" / "metrics.jsonl").open().readline())
             for g in ("regdpo", "regdpo-swap")}
    assert np.isclose(first["regdpo"]["ref_err_w"], first["regdpo-swap"]["ref_err_l"], rtol=1e-6)
    assert np.isclose(first["regdpo"]["ref_err_l"], first["regdpo-swap"]["ref_err_w"], rtol=1e-6)
    assert first["regdpo"]["ref_err_w"] != first["regdpo"]["ref_err_l"]

    # edited-GT: the loser of each pair is its winner's clip reversed (read moving the other way) or shuffled
    edited = [json.loads(line) for line in (out / "data" / "edited" / "encoded" / "train.jsonl").open()]
    assert [p["loser"]["id"] for p in edited] == [f"{p['winner']['id']}.{e}" for p, e in
                                                  zip(edited, ["reversed", "shuffled"] * 2)]
    for p in edited[::2]:
        scores, _ = score_videos([{"video": p[k]["path"], "caption": p["prompt"]} for k in ("winner", "loser")], "/")
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
        assert opposite[scores[0]["measured_direction"]] == scores[1]["measured_direction"], p["id"]

    # on-policy: two generations of the base per prompt, the world metrics' pick wins (scores.csv: 5 over 1)
    ranked = dict(line.split(",")[0::3] for line in (out / "data" / "onpolicy" / "scores.csv").read_text().split()[1:])
    onpolicy = [json.loads(line) for line in (out / "data" / "onpolicy" / "onpolicy.jsonl").open()]
    assert len(onpolicy) == 4 and {p["gt_id"] for p in onpolicy} == {p["gt_id"] for p in pairs}
    assert all((ranked[p["winner"]["id"]], ranked[p["loser"]["id"]]) == ("5", "1") for p in onpolicy)
    assert "onpolicy.jsonl" in (out / "regdpo-onpolicy" / "seed1" / "run" / "config.yaml").read_text()

    text = report.read_text()
    for needle in ("## What held and what did not", "one seed: no claim", "Sign check", "Table 10 analogue",
                   "Base @ 0", f"{GROUPS['regdpo'].label} @ 2"):
        assert needle in text, needle
    for png in ("fig2_training_curves.png", "fig7_train.png", "fig7_test.png"):
        assert (out / png).stat().st_size > 0
    for group in ("base", *groups):  # 4 samples of 32 x 32, 8 frames each
        assert Image.open(out / "sheets" / f"{group}.png").size == (8 * 32, 4 * 32)


def test_a_difference_holds_only_beyond_the_spread_of_several_seeds():
    assert compare((0.9, 0.0, 1), (0.5, 0.0, 1)) == "one seed: no claim"
    assert compare((0.9, 0.1, 3), (0.5, 0.1, 3)) == "better"
    assert compare((0.9, 0.2, 3), (0.6, 0.2, 3)) == "within the spread"
    assert compare((0.3, 0.05, 3), (0.6, 0.05, 3)) == "worse"
    assert compare((0.3, 0.05, 3), (0.6, 0.05, 3), higher=False) == "better"


def test_the_report_says_what_held_from_the_numbers(tmp_path):
    """claims() on results of 2 seeds: DPO's grid energy x10 of Base's at step 2 is a collapse, its log's Fig. 2
    dynamics are read per seed, and Reg-DPO against its swapped twin moves accuracy the other way."""
    from dataclasses import replace

    from launch.experiment import QUICK, claims, with_totals

    def summary(accuracy, grid):
        return {"videos": 4, "rejected": 0, "colour_accuracy": accuracy, "shape_accuracy": accuracy,
                "direction_accuracy": accuracy, "accuracy": accuracy, "straightness": 0.9, "area_cv": 0.1,
                "colour_std": 1.0, "off_object_rms": 5.0, "sharpness": 0.5, "grid_energy": grid, "distance": 1.0}

    values = {"base": (0.5, 1.0), "regdpo": (0.9, 1.0), "regdpo-swap": (0.1, 1.0), "dpo": (0.5, 10.0)}
    results = {("base", 0, 0): {split: summary(*values["base"]) for split in ("train", "test")}}
    runs = {}
    for name in ("regdpo", "regdpo-swap", "dpo"):
        for seed in (1, 2):
            accuracy, grid = values[name]
            results[name, seed, 2] = {split: summary(accuracy + 0.01 * seed, grid) for split in ("train", "test")}
            runs[name, seed] = tmp_path / name / str(seed)
            runs[name, seed].mkdir(parents=True)
            log = [{"step": k, "s": -k, "dgr": 250 / k ** 2, "win_gap": k, "lose_gap": 2 * k} for k in range(1, 11)]
            (runs[name, seed] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    size = replace(QUICK, groups=("base", "regdpo", "regdpo-swap", "dpo"), seeds=(1, 2))
    text = "\n".join(claims(with_totals(results), runs, size))
    assert "DPO collapsed at step 2: grid energy x10.0 of Base's." in text
    assert "Reg-DPO (r = DGR): no collapse" in text
    assert "Reg-DPO (r = DGR) vs Base, test accuracy at the last step: 0.915 +- 0.005 vs 0.500: better." in text
    assert "Sign check, test accuracy against Base (0.500): Reg-DPO 0.915 +- 0.005 (better), swapped 0.115 +- " \
           "0.005 (worse): the metrics move the other way." in text
    assert text.count("s falls (holds), DGR tends to 0 (< 0.1 of its start) (holds), win gap rises (holds), " \
                      "lose gap rises (holds)") == 2
