"""megatron_wan.eval against the paper: ranking points, ties, arrows and Total_Score of Tables 2, 5, 6, 9, 10 and the
GSB Scores of Tables 1, 3, 4, 8 (transcribed in tests/fixtures/paper_tables); VBench's result format and the errors
when VBench or its weights are missing; PNG curves."""

import csv
import json
import os
import re
import sys
from pathlib import Path

import pytest

from megatron_wan.eval import gsb_score, rank_methods
from megatron_wan.eval.__main__ import main
from megatron_wan.eval.curves import checkpoint_totals
from megatron_wan.eval.gsb import read_annotations
from megatron_wan.eval.ranking import DIMENSIONS, ranked_table
from megatron_wan.eval.vbench import missing_requirements, parse_results

PAPER = Path(__file__).parent / "fixtures" / "paper_tables"
VBENCH_TABLES = ["table2", "table5", "table6", "table9", "table10"]
GSB_TABLES = ["table1", "table3", "table4", "table8"]
CELL = re.compile(r"(?P<value>[0-9.]+) [↑↓-] \[(?P<points>\d+)\]")
UNDERLINE = re.compile(r"</?u>")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What VBench 0.1.5's local mode reads from VBENCH_CACHE_DIR for the six custom-input dimensions (vbench/utils.py)
VBENCH_LOCAL_FILES = ["dino_model/dino_vitbase16_pretrain.pth", "clip_model/ViT-B-32.pt", "amt_model/amt-s.pth",
                      "raft_model/models/raft-things.pth", "clip_model/ViT-L-14.pt",
                      "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                      "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth"]


def paper_csv(name) -> list[list[str]]:
    with open(PAPER / f"{name}.csv", newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def paper_vbench(name) -> dict:
    """A transcribed VBench table: values, points (with Total_Score), underlined cells and the cells as printed."""
    header, *rows = paper_csv(name)
    dims = [next(k for k, v in DIMENSIONS.items() if v == h) for h in header[1:-1]]
    table = {"header": header, "dims": dims, "values": {}, "points": {}, "underlined": set(),
             "plain": [[UNDERLINE.sub("", c) for c in row] for row in rows]}
    for method, *cells, total in rows:
        table["underlined"] |= {(method, col) for col, c in zip(header[1:], [*cells, total]) if "<u>" in c}
        parsed = [CELL.fullmatch(UNDERLINE.sub("", c)) for c in cells]
        table["values"][method] = {d: float(m["value"]) for d, m in zip(dims, parsed)}
        table["points"][method] = {d: int(m["points"]) for d, m in zip(dims, parsed)}
        table["points"][method]["Total_Score"] = int(UNDERLINE.sub("", total))
    return table


def counts(cell) -> tuple[int, int, int]:
    good, same, bad = (int(x) for x in cell.split("/"))
    return good, same, bad


# --- ranking: Tables 2, 5, 6, 9, 10 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VBENCH_TABLES)
def test_rank_methods_reproduces_the_paper_points_and_total_scores(name):
    paper = paper_vbench(name)
    assert rank_methods(paper["values"]) == paper["points"]


def test_tied_values_share_the_highest_points_of_their_block():
    # every group of equal printed values in the paper's tables: the paper gives all of them the same points,
    # n minus the number of strictly better methods, and so must we
    groups = 0
    for name in VBENCH_TABLES:
        paper = paper_vbench(name)
        ranked = rank_methods(paper["values"])
        for dim in paper["dims"]:
            column = {m: row[dim] for m, row in paper["values"].items()}
            for value in {v for v in column.values() if list(column.values()).count(v) > 1}:
                tied = [m for m, v in column.items() if v == value]
                better = sum(v > value for v in column.values())
                assert {paper["points"][m][dim] for m in tied} == {len(column) - better}
                assert {ranked[m][dim] for m in tied} == {len(column) - better}
                groups += 1
    assert groups == 5  # Table 6 Dyn.Deg.; Table 10 Bkgd.Cons. (two groups), Mot.Smooth. and Dyn.Deg.


def test_ties_are_judged_at_the_printed_precision():
    paper = paper_vbench("table10")
    values = {m: dict(row) for m, row in paper["values"].items()}
    values["Base"]["motion_smoothness"] = 0.9854012  # both print 0.98540: still a tie, as in the paper
    values["r = 25"]["motion_smoothness"] = 0.9853996
    assert rank_methods(values) == paper["points"]
    assert rank_methods(values, decimals=7) != paper["points"]


@pytest.mark.parametrize("name", VBENCH_TABLES)
def test_ranked_table_is_the_paper_layout_with_its_arrows(name):
    paper = paper_vbench(name)
    header, plain, _ = ranked_table(paper["values"], base="Base")
    assert header == paper["header"]
    assert plain == paper["plain"]


def test_second_best_underlines_agree_with_the_paper():
    for name in VBENCH_TABLES:
        paper = paper_vbench(name)
        header, _, marked = ranked_table(paper["values"], base="Base")
        ours = {(row[0], col) for row in marked for col, cell in zip(header[1:], row[1:]) if "<u>" in cell}
        assert paper["underlined"] <= ours, name  # the paper's text keeps only some of its underlines
        if name == "table2":  # ... all of them in Table 2
            assert ours == paper["underlined"]


def test_rank_command_writes_the_table_as_markdown_and_csv(tmp_path, capsys):
    paper = paper_vbench("table2")  # the table whose underlines the paper's text keeps
    values = tmp_path / "values.csv"
    with values.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *paper["dims"]])
        writer.writerows([m, *(row[d] for d in paper["dims"])] for m, row in paper["values"].items())
    main(["rank", str(values), "--base", "Base", "--out", str(tmp_path / "table2")])
    with open(tmp_path / "table2.csv", newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [paper["header"], *paper["plain"]]
    markdown = (tmp_path / "table2.md").read_text(encoding="utf-8")
    assert markdown == capsys.readouterr().out
    # the paper's cells, its underlines, and bold for the best of each column (the caption's rule)
    n, best_total = len(paper["values"]), max(p["Total_Score"] for p in paper["points"].values())
    for method, *cells, total in paper_csv("table2")[1:]:
        bold = [re.sub(r"^([0-9.]+)", r"**\1**", c) if f"[{n}]" in c else c for c in cells]
        total = f"**{total}**" if total == str(best_total) else total
        assert f"| {method} | {' | '.join(bold)} | {total} |\n" in markdown


def test_rank_rejects_a_method_with_other_dimensions(tmp_path):
    values = tmp_path / "values.jsonl"
    values.write_text('{"method": "Base", "dynamic_degree": 0.5, "imaging_quality": 0.7}\n'
                      '{"method": "DPO", "dynamic_degree": 0.6}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"method 'DPO'.*missing \['imaging_quality'\]"):
        main(["rank", str(values)])


# --- GSB: Tables 1, 3, 4, 8 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GSB_TABLES)
def test_gsb_score_reproduces_the_paper_scores(name):
    header, *rows = paper_csv(name)
    assert header == ["Comparison (A vs B)", "VQ", "VQ Score", "PF", "PF Score"]
    for _, vq, vq_score, pf, pf_score in rows:
        assert f"{gsb_score(*counts(vq)):.2f}" == vq_score
        assert f"{gsb_score(*counts(pf)):.2f}" == pf_score


def write_annotations(path, table):
    """One record per judged pair whose labels add up to the table's counts."""
    header, *rows = paper_csv(table)
    records = []
    for comparison, vq, _, pf, _ in rows:
        a, b = comparison.split(" vs ")
        labels = {dim: [lab for lab, n in zip(("Good", "Same", "bad"), counts(cell)) for _ in range(n)]  # any case
                  for dim, cell in (("VQ", vq), ("PF", pf))}
        records += [{"id": i, "model_a": a, "model_b": b, "VQ": v, "PF": p}
                    for i, (v, p) in enumerate(zip(labels["VQ"], labels["PF"]))]
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "model_a", "model_b", "VQ", "PF"])
            writer.writeheader()
            writer.writerows(records)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return [header, *rows]


@pytest.mark.parametrize("table, suffix", [("table3", ".csv"), ("table1", ".jsonl")])
def test_gsb_command_turns_annotations_into_the_paper_table(tmp_path, table, suffix):
    paper = write_annotations(tmp_path / f"labels{suffix}", table)
    main(["gsb", str(tmp_path / f"labels{suffix}"), "--out", str(tmp_path / "gsb")])
    with open(tmp_path / "gsb.csv", newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == paper


def test_gsb_annotation_errors_name_the_file_line_and_column(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("model_a,model_b,VQ,PF\nReg-DPO,Base,Good,Same\nReg-DPO,Base,better,Same\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(labels))}:3: VQ is 'better'"):
        read_annotations(labels)
    (tmp_path / "short.jsonl").write_text('{"model_a": "A", "model_b": "B", "VQ": "Good"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"short.jsonl:1: missing PF"):
        read_annotations(tmp_path / "short.jsonl")


# --- VBench ---------------------------------------------------------------------------------------------------------

def test_vbench_without_its_environment_or_weights_names_each_missing_piece(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a cat-0.mp4").write_bytes(b"")
    venv, cache = tmp_path / ".venv-eval", tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_:
        main(["vbench", "--videos", f"Base={videos}", "--out", str(tmp_path / "out"), "--venv", str(venv),
              "--cache-dir", str(cache)])
    message = str(exit_.value.code)
    assert f"{venv}/bin/python" in message and "make eval-env" in message
    for rel in VBENCH_LOCAL_FILES:
        assert str(cache / rel) in message
    assert "dino_model/facebookresearch_dino_main" in message  # the DINO repository VBench loads the model from
    assert not (tmp_path / "out").exists()  # nothing ran


def test_vbench_names_exactly_what_is_still_missing(tmp_path):
    venv = tmp_path / ".venv-eval"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")  # a python without vbench
    cache = tmp_path / "cache"
    for rel in VBENCH_LOCAL_FILES:
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).write_bytes(b"")
    problems = missing_requirements(venv, cache)
    assert len(problems) == 3, problems
    assert "vbench is not installed" in problems[0]
    assert "dino_model/facebookresearch_dino_main/hubconf.py" in problems[1]
    assert "torch/hub/checkpoints/dino_vitbase16_pretrain.pth" in problems[2]  # DINO's hub entry reads TORCH_HOME
    assert missing_requirements(venv, cache, ["imaging_quality"]) == problems[:1]


FAKE_VBENCH = """#!{python}
# Stands in for .venv-eval's python: passes the requirements probe; as `-m torch.distributed.run ... -m
# vbench.launch.evaluate` it records its command line and environment and writes a results file in VBench's
# format holding the paper's values of the method named by the videos folder.
import json, os, sys, time
if sys.argv[1] == "-c":
    sys.exit(0)
args = sys.argv[1:]
out, videos = args[args.index("--output_path") + 1], args[args.index("--videos_path") + 1]
values = json.load(open({values!r}))[os.path.basename(videos)]
with open(os.path.join(out, "call.json"), "w") as f:
    json.dump({{"argv": args, "env": {{k: os.environ.get(k) for k in ("VBENCH_CACHE_DIR", "TORCH_HOME")}}}}, f)
clip = os.path.join(videos, "a cat-0.mp4")
name = time.strftime("results_%Y-%m-%d-%H:%M:%S_eval_results.json")
with open(os.path.join(out, name), "w") as f:
    json.dump({{d: [v, [{{"video_path": clip, "video_results": v}}]] for d, v in values.items()}}, f, indent=4)
"""


def test_vbench_command_runs_vbench_per_method_and_ranks_the_results(tmp_path):
    paper = paper_vbench("table5")
    (tmp_path / "values.json").write_text(json.dumps(paper["values"]), encoding="utf-8")
    venv, cache = tmp_path / ".venv-eval", tmp_path / "cache"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_VBENCH.format(python=sys.executable, values=str(tmp_path / "values.json")))
    python.chmod(0o755)
    for rel in [*VBENCH_LOCAL_FILES, "dino_model/facebookresearch_dino_main/hubconf.py",
                "torch/hub/checkpoints/dino_vitbase16_pretrain.pth"]:
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).write_bytes(b"")
    args = []
    for method in paper["values"]:
        (tmp_path / "videos" / method).mkdir(parents=True)
        (tmp_path / "videos" / method / "a cat-0.mp4").write_bytes(b"")
        args += ["--videos", f"{method}={tmp_path / 'videos' / method}"]
    out = tmp_path / "out"
    main(["vbench", *args, "--venv", str(venv), "--cache-dir", str(cache), "--base", "Base", "--out", str(out)])
    with open(out / "vbench.csv", newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [paper["header"], *paper["plain"]]
    call = json.loads((out / "Reg-DPO" / "call.json").read_text())
    assert call["env"] == {"VBENCH_CACHE_DIR": str(cache), "TORCH_HOME": str(cache / "torch")}
    argv = " ".join(call["argv"])
    assert argv.startswith("-m torch.distributed.run --standalone --nproc_per_node=1 -m vbench.launch.evaluate")
    assert f"--dimension {' '.join(DIMENSIONS)} --mode custom_input --load_ckpt_from_local True" in argv


def test_parse_results_reads_the_aggregates_of_a_vbench_results_file():
    path = PAPER / "vbench_custom_input_eval_results.json"
    scores = parse_results(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    videos = {dim: entry[1] for dim, entry in raw.items()}

    def mean(dim):
        return sum(v["video_results"] for v in videos[dim]) / len(videos[dim])

    # each aggregate as VBench computes it from its per-video entries
    bkgd = videos["background_consistency"]
    assert scores["background_consistency"] == pytest.approx(
        sum(v["video_sim"] for v in bkgd) / sum(v["cnt_per_video"] for v in bkgd))
    assert scores["imaging_quality"] == pytest.approx(mean("imaging_quality") / 100)
    assert scores["dynamic_degree"] == pytest.approx(mean("dynamic_degree"))
    for dim in ("subject_consistency", "motion_smoothness", "aesthetic_quality"):
        assert scores[dim] == pytest.approx(mean(dim))
    with pytest.raises(ValueError, match="no 'color'"):
        parse_results(path, ["color"])


def test_vbench_results_of_each_method_become_the_paper_table(tmp_path):
    paper = paper_vbench("table6")
    args = []
    for method, row in paper["values"].items():
        path = tmp_path / f"{method}_eval_results.json"
        clip = f"/videos/{method}/a cat-0.mp4"
        path.write_text(json.dumps({d: [v, [{"video_path": clip, "video_results": v}]] for d, v in row.items()}))
        args += ["--results", f"{method}={path}"]
    main(["vbench", *args, "--base", "Base", "--out", str(tmp_path / "out")])
    with open(tmp_path / "out" / "vbench.csv", newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [paper["header"], *paper["plain"]]
    with open(tmp_path / "out" / "values.csv", newline="", encoding="utf-8") as f:
        assert {r.pop("method"): {d: float(v) for d, v in r.items()} for r in csv.DictReader(f)} == paper["values"]


# --- curves ---------------------------------------------------------------------------------------------------------

def test_checkpoints_of_several_runs_are_ranked_jointly():
    # Table 10's rows as checkpoints of two runs: ranked in one table they keep the paper's Total_Scores
    paper = paper_vbench("table10")
    methods = list(paper["values"])
    run_of = {m: ("low r", 300 * i) if i < 4 else ("high r", 300 * (i - 4)) for i, m in enumerate(methods)}
    curves = checkpoint_totals({run_of[m]: row for m, row in paper["values"].items()})
    expected = {}
    for m in methods:
        run, step = run_of[m]
        expected.setdefault(run, []).append((step, paper["points"][m]["Total_Score"]))
    assert curves == {run: sorted(points) for run, points in expected.items()}


def test_curves_command_writes_pngs(tmp_path):
    for run, drop in (("DPO", 1.0), ("r = DGR", 0.2)):
        path = tmp_path / run / "metrics.jsonl"  # a training run's output directory
        path.parent.mkdir()
        lines = [{"step": s, "dgr": 125 * (1 - drop * s / 40), "r": 0.0 if run == "DPO" else 125.0, "win_gap": 0.01 * s,
                  "lose_gap": 0.02 * s, "s": -0.01 * s, "loss_dpo": 0.69 - drop * s / 100} for s in range(0, 40, 10)]
        lines[-1]["loss_dpo"] = float("nan")  # a diverged step is plotted as a gap, not an error
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    logs = ["--log", f"DPO={tmp_path / 'DPO' / 'metrics.jsonl'}", "--log", str(tmp_path / "r = DGR")]
    paper = paper_vbench("table10")
    checkpoints = tmp_path / "checkpoints.jsonl"
    checkpoints.write_text("".join(json.dumps({"run": m, "step": 300, **row}) + "\n"
                                   for m, row in paper["values"].items()), encoding="utf-8")
    written = main(["curves", *logs, "--checkpoints", str(checkpoints), "--out", str(tmp_path / "plots")])
    assert [p.name for p in written] == ["training_curves.png", "total_score.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000
    with open(tmp_path / "plots" / "total_score.csv", newline="", encoding="utf-8") as f:
        totals = {r["run"]: int(r["Total_Score"]) for r in csv.DictReader(f)}
    assert totals == {m: p["Total_Score"] for m, p in paper["points"].items()}
