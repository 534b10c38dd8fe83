"""The procedural world's pixel metrics (megatron_wan.eval.world): its clips through the data stages score as
drawn; each defect scores worse on the measure meant to catch it while mild blur and colour shifts do not; the CLI
writes scores and summaries and ranks groups."""

import csv
import json

import numpy as np
import pytest

from data_tools.__main__ import main as data_main
from data_tools.media import read_frames
from data_tools.stage import read_jsonl
from data_tools.world import clip_rows, render, write_clip, write_world
from megatron_wan.eval.__main__ import main as eval_main
from megatron_wan.eval.world import (
    features,
    measure,
    rank_groups,
    read_rows,
    score_frames,
    score_videos,
    set_distance,
    summarize,
)
from megatron_wan.eval.world_vocab import BACKGROUND, COLOURS, DIRECTIONS, SHAPES
from megatron_wan.video_io import encode_h264, read_rgb

TRUTH = ("shape", "colour", "direction")


def truth(row):
    return {k: row[k] for k in TRUTH}


def frames_of(row):
    return render(row["shape"], row["colour"], row["x0"], row["y0"], row["side"], row["velocity"])


def covering(rows):
    """12 rows of `rows` covering every shape, colour and direction (one per (i mod 3, i mod 4, i // 3))."""
    wanted = [(SHAPES[i % 3], list(COLOURS)[i % 4], list(DIRECTIONS)[i // 3]) for i in range(12)]
    return [next(r for r in rows if (r["shape"], r["colour"], r["direction"]) == w) for w in wanted]


def blur(frames, sigma):
    """Gaussian blur of RGB frames [T, H, W, 3] (separable, edges repeated)."""
    r = int(3 * sigma) + 1
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    out = frames.astype(np.float64)
    for axis in (1, 2):
        padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in range(4)], mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(padded, range(i, i + n), axis=axis) for i, w in enumerate(k / k.sum()))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def colour_shift(frames, offset):
    """Brightness x0.85 and `offset` added per channel: a decoder's colour drift."""
    return np.clip(np.round(frames * 0.85 + np.array(offset)), 0, 255).astype(np.uint8)


def with_grid(frames, amplitude):
    """A faint 8-pixel grid (every 8th row and column brighter by `amplitude`)."""
    grid = np.zeros(frames.shape[1:3])
    grid[::8], grid[:, ::8] = amplitude, amplitude
    return np.clip(frames + grid[None, :, :, None], 0, 255).astype(np.uint8)


def write_list(folder, rows):
    """A world folder's captions.csv and attributes.jsonl for `rows` (as write_world writes them)."""
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("video", "caption"), *((r["video"], r["caption"]) for r in rows)])
    (folder / "attributes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_world_clips_through_the_data_stages_score_as_drawn(tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    rows = covering(clip_rows(48, seed=3))
    for row in rows:
        write_clip(world / row["video"], row)
    write_list(world, rows)
    stages = [("probe", world, []), ("select", "probe", ["--min-edge", 32, "--duration", 1, 2, "--aspects", "1:1"]),
              ("filter", "select", ["--min-motion", 0.1]),
              ("normalize", "filter", ["--format", "world", "--captions", world / "captions.csv"])]
    for stage, source, flags in stages:
        source = source if source == world else tmp_path / source
        data_main([str(a) for a in (stage, "--in", source, "--out", tmp_path / stage, *flags)])
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in read_jsonl(tmp_path / "probe" / "rejects.jsonl")) == [
        "attributes.jsonl", "captions.csv"]
    for stage in ("select", "filter", "normalize"):
        assert not (tmp_path / stage / "rejects.jsonl").exists() or not read_jsonl(tmp_path / stage / "rejects.jsonl")
    manifest = read_jsonl(tmp_path / "normalize" / "manifest.jsonl")
    assert len(manifest) == 12
    for record in manifest:  # megatron_wan's reader sees the frames the data stages see
        assert read_rgb(record["path"]).shape == (17, 32, 32, 3)
        np.testing.assert_array_equal(read_rgb(record["path"]), read_frames(record["path"]))

    scores, rejects = score_videos(read_rows(tmp_path / "normalize" / "manifest.jsonl"), tmp_path / "normalize")
    drawn = {r["video"].removesuffix(".mp4"): truth(r) for r in rows}
    assert not rejects and len(scores) == 12
    for s in scores:  # the truth read from the normalized clip's prompt is the drawn one, and it is measured
        video = s["video"].rsplit("/", 1)[-1].removesuffix(".mp4")
        assert truth(s) == drawn[video]
        assert {k: s[f"measured_{k}"] for k in TRUTH} == drawn[video]
    summary = summarize(scores, rejects)
    assert (summary["colour_accuracy"], summary["shape_accuracy"], summary["direction_accuracy"]) == (1.0, 1.0, 1.0)
    speeds = {r["video"].removesuffix(".mp4"): r["speed"] for r in rows}
    assert max(abs(s["speed"] - speeds[s["video"].rsplit("/", 1)[-1].removesuffix(".mp4")]) for s in scores) < 0.05


@pytest.mark.parametrize("change", ["none", "blur 0.8", "darker +15 -15 +15", "darker -15 +15 -15"])
def test_every_combination_is_measured_right_through_mild_blur_and_colour_shift(change):
    rows = clip_rows(48, seed=5)  # one round: every (shape, colour, direction)
    alter = {"none": lambda f: f, "blur 0.8": lambda f: blur(f, 0.8),
             "darker +15 -15 +15": lambda f: colour_shift(f, (15, -15, 15)),
             "darker -15 +15 -15": lambda f: colour_shift(f, (-15, 15, -15))}[change]
    wrong = [(truth(r), {k: s[f"measured_{k}"] for k in TRUTH}) for r in rows
             for s in [score_frames(alter(frames_of(r)), truth(r))] if not all(s[f"{k}_ok"] for k in TRUTH)]
    assert not wrong


def test_each_defect_scores_worse_on_its_measure():
    rows = covering(clip_rows(48, seed=11))
    rng = np.random.default_rng(0)
    clean = [score_frames(frames_of(r), truth(r)) for r in rows]
    assert all(s[f"{k}_ok"] for s in clean for k in TRUTH)

    def scored(alter):
        return [score_frames(alter(r, frames_of(r)), truth(r)) for r in rows]

    def mean(scores, key):
        return float(np.mean([s[key] for s in scores]))

    other = {c: list(COLOURS)[(i + 1) % 4] for i, c in enumerate(COLOURS)}
    recoloured = scored(lambda r, f: render(r["shape"], other[r["colour"]], r["x0"], r["y0"], r["side"],
                                            r["velocity"]))
    assert not any(s["colour_ok"] for s in recoloured)
    assert not any(s["direction_ok"] for s in scored(lambda r, f: f[::-1]))
    shuffled = scored(lambda r, f: f[rng.permutation(len(f))])
    assert mean(shuffled, "straightness") < 0.5 < 0.95 < mean(clean, "straightness")
    assert mean(shuffled, "direction_ok") < 1
    blurred = scored(lambda r, f: blur(f, 1.5))
    assert max(s["sharpness"] for s in blurred) < min(s["sharpness"] for s in clean)
    gridded = scored(lambda r, f: with_grid(f, 4))
    assert min(s["grid_energy"] for s in gridded) > 5 * max(s["grid_energy"] for s in clean)
    flicker = scored(lambda r, f: np.where(np.arange(len(f))[:, None, None, None] % 4 == 1, BACKGROUND, f))
    assert min(s["area_cv"] for s in flicker) > max(s["area_cv"] for s in clean)

    def clutter(r, f):
        f = f.copy()
        f[:, 1:4, 1:4] = (40, 40, 40)  # a dark blob in a corner, smaller than the object
        return f

    cluttered = scored(clutter)
    assert min(s["off_object_rms"] for s in cluttered) > max(s["off_object_rms"] for s in clean)
    assert all(s[f"{k}_ok"] for s in cluttered for k in TRUTH)  # the object is still the largest component


def test_a_clip_without_object_or_motion_is_wrong_not_a_crash():
    grey = np.broadcast_to(np.array(BACKGROUND, np.uint8), (17, 32, 32, 3))
    empty = score_frames(grey, {"shape": "circle", "colour": "red", "direction": "left"})
    assert not any(empty[f"{k}_ok"] for k in TRUTH)
    assert (empty["object_frames"], empty["area"]) == (0.0, 0.0)
    still = render("square", "blue", 10, 10, 12, (0, 0))
    found = measure(still)
    assert (found["shape"], found["colour"], found["direction"]) == ("square", "blue", None)
    white = np.where(still == still[0, 0, 0], still, 255).astype(np.uint8)  # the square, without colour
    assert (measure(white)["shape"], measure(white)["colour"]) == ("square", None)
    line = np.broadcast_to(np.array(BACKGROUND, np.uint8), (17, 32, 32, 3)).copy()
    line[:, 16, 4:20] = COLOURS["red"]  # one row high: no vertical spread
    assert measure(line)["colour"] == "red" and np.isfinite(measure(line)["skew"])
    half = render("circle", "green", 4, 10, 12, (0.6, 0))
    half[8:] = BACKGROUND  # the object vanishes half way
    found = measure(half)
    assert found["direction"] == "right" and found["object_frames"] == 8 / 17
    assert found["area_cv"] > 0.9
    assert measure(half[:1])["direction"] is None


def test_set_distance_is_small_between_real_sets_and_large_against_defects():
    rows = clip_rows(48, seed=2)
    real = [score_frames(frames_of(r), truth(r)) for r in rows]
    shuffled = [score_frames(frames_of(r)[np.random.default_rng(i).permutation(17)], truth(r))
                for i, r in enumerate(rows[:24])]
    a, b = features(real[:24]), features(real[24:])
    assert set_distance(a, a) == pytest.approx(0, abs=1e-12)
    assert set_distance(a, b) < 0.5 * set_distance(features(shuffled), b)
    with pytest.raises(ValueError, match="needs videos in both sets"):
        set_distance(a, features([]))


def test_cli_writes_scores_and_ranks_real_clips_above_degraded(tmp_path, capsys):
    real = tmp_path / "real"
    write_world(real, 8, seed=4)
    degraded = tmp_path / "degraded"
    degraded.mkdir()
    rows = read_jsonl(real / "attributes.jsonl")
    rng = np.random.default_rng(1)
    for row in rows:
        encode_h264(degraded / row["video"], blur(read_rgb(real / row["video"]), 1.5)[rng.permutation(17)], 16, 10,
                    "medium", threads=1)
    listed = degraded / "list.jsonl"  # a samples list: paths and captions only, and one missing video
    listed.write_text("".join(json.dumps({"path": r["video"], "caption": r["caption"]}) + "\n"
                              for r in [*rows, {"video": "gone.mp4", "caption": rows[0]["caption"]}]))

    eval_main(["world", "--attributes", str(real / "attributes.jsonl"), "--out", str(tmp_path / "one")])
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one["videos"] == 8 and one["accuracy"] == 1.0
    assert len((tmp_path / "one" / "scores.jsonl").read_text().splitlines()) == 8

    out = tmp_path / "ranked"
    ranked = eval_main(["world", "--group", "real", str(real), str(real / "attributes.jsonl"), "--group", "degraded",
                        str(degraded), str(listed), "--out", str(out), "--reference", str(real / "attributes.jsonl"),
                        "--reference-split", "all"])
    assert ranked["real"]["Total_Score"] > ranked["degraded"]["Total_Score"]
    summary = {g: json.loads((out / g / "summary.json").read_text()) for g in ("real", "degraded")}
    assert rank_groups(summary) == ranked
    assert summary["real"]["distance"] == pytest.approx(0, abs=1e-9)  # the reference itself
    assert summary["degraded"]["distance"] > 0.5
    assert summary["degraded"]["videos"] == 8
    assert [r["video"] for r in summary["degraded"]["rejects"]] == ["gone.mp4"]
    assert "no such file" in summary["degraded"]["rejects"][0]["reason"]
    assert (out / "ranking.md").is_file() and "Total_Score" in capsys.readouterr().out
