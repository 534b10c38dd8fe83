import os
import warnings

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """GT-Pairs from the real clips (see gtpair_data.make_gt_pairs)."""
    from gtpair_data import make_gt_pairs

    return make_gt_pairs(tmp_path_factory.mktemp("gtpairs"))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny random Wan 2.1 folders in diffusers layout: {"t2v": DIR, "i2v": DIR}."""
    from gtpair_data import make_models

    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def encoded(pairs, models, tmp_path_factory):
    """{task: encoded dataset directory} of the GT-Pairs with the tiny encoders."""
    from gtpair_data import run

    out = tmp_path_factory.mktemp("encoded")
    for task in ("t2v", "i2v"):
        run("encode", "--in", pairs / "pairs", "--out", out / task, "--model", models[task])
    return {task: out / task for task in ("t2v", "i2v")}


@pytest.fixture(scope="session", autouse=True)
def process_groups():
    """This pytest process's one-rank process groups, set up first as every entry point does (a model reads them;
    multi-process tests set up their own in each worker)."""
    from megatron_wan import parallel

    parallel.initialize()
@pytest.fixture(scope="session")
def wan22_models(tmp_path_factory):
    """Tiny random Wan 2.2 folders in diffusers layout: {"t2v-a14b": DIR, "i2v-a14b": DIR, "ti2v": DIR}."""
    from megatron_wan.models.wan22.tiny import TINY_PRESETS, write_tiny

    root = tmp_path_factory.mktemp("wan22")
    return {task: write_tiny(root / task, task) for task in TINY_PRESETS}


@pytest.fixture(scope="session")
def wan22_encoded(wan22_models, pairs, tmp_path_factory):
    """The GT-Pairs encoded with the tiny T2V-A14B folder's encoders (the Wan 2.2 training runs' data)."""
    from gtpair_data import run

    out = tmp_path_factory.mktemp("wan22-encoded") / "t2v-a14b"
    run("encode", "--in", pairs / "pairs", "--out", out, "--model", wan22_models["t2v-a14b"])
    return out
