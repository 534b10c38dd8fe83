"""`make demo`, reduced (two clips, a few training steps): every stage on real footage, the report, the metrics with
every preference metric, the curves PNG and a decodable sampled mp4; a second run reuses the finished stages."""

import json

import av

from launch.demo import main

PREFERENCE_METRICS = ("dgr", "r", "dgr_plus_r", "win_gap", "lose_gap", "s", "loss_dpo", "loss_sft", "implicit_acc",
                      "model_err_w", "model_err_l", "ref_err_w", "ref_err_l")


def test_reduced_demo_end_to_end(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--steps", "3", "--clips", "bigbuckbunny", "carphone_pristine", "bikes"]
    report = main(argv)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    assert "tiny and randomly initialized" in text and "| filter | 3 | 2 | 1 | bikes: frequent cuts" in text
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(k in r for r in rows for k in PREFERENCE_METRICS)
    assert [r["step"] for r in logged if "val/loss" in r] == [1, 2, 3]  # validated every step, 3 steps
    assert "## Validation (steps 1, 2, 3" in text and "| val/loss_dpo |" in text
    assert "![samples_step_000002](samples_step_000002.png)" in text  # sampled every other step
    assert (tmp_path / "samples_step_000002.png").stat().st_size > 1000
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    with av.open(str(tmp_path / "sample.mp4")) as c:
        stream = c.streams.video[0]
        assert (sum(1 for _ in c.decode(stream)), float(stream.average_rate)) == (49, 16.0)
    assert sorted(p.name for p in (tmp_path / "t2v" / "export").iterdir()) == ["comfyui", "diffusers", "peft",
                                                                              "transformer"]
    capsys.readouterr()
    main(argv)  # again: every stage finds its work done
    out = capsys.readouterr().out
    for stage in ("probe", "select", "filter", "normalize"):
        assert f"{stage}: " in out and "already done" in out
    assert "encode: 4 inputs, 4 accepted, 0 rejected (4 already done)" in out  # the stage runner's summary

    from megatron_wan.eval.__main__ import main as evaluate

    evaluation = tmp_path / "eval"
    counts = evaluate(["sample", "--model", str(tmp_path / "t2v" / "tiny-wan"), "--pairs",
                       str(tmp_path / "t2v" / "encoded" / "pairs.jsonl"), "--checkpoint",
                       f"RegDPO={tmp_path / 't2v' / 'train'}", "--out", str(evaluation), "--frames", "49",
                       "--steps", "2"])
    assert counts == {"Base": 2, "RegDPO": 2}
    names = json.loads((evaluation / "RegDPO" / "prompts.json").read_text())
    assert len(names) == 2 and all((evaluation / "RegDPO" / n).exists() for n in names)
    assert sorted(names) == sorted(json.loads((evaluation / "Base" / "prompts.json").read_text()))
    (png,) = evaluate(["curves", "--log", f"RegDPO={tmp_path / 't2v' / 'train'}", "--out", str(evaluation)])
    assert png.stat().st_size > 10_000
