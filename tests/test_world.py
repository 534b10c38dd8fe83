"""The world's base model: the committed pipeline folder (assets/world/base, built by `make world`) loads and samples
in diffusers, its VAE keeps what the clips show, and the builder (launch.world) runs end to end at a tiny size."""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "assets" / "world" / "base"


def test_committed_base_matches_its_checksums():
    sums = (REPO / "assets" / "world" / "SHA256SUMS").read_text().split("\n")
    listed = {}
    for line in filter(None, sums):
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    files = {str(p.relative_to(BASE.parent)) for p in BASE.rglob("*") if p.is_file()}
    assert files == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((BASE.parent / name).read_bytes()).hexdigest() == digest, name


def test_base_loads_and_samples_in_diffusers():
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(BASE)
    video = pipe("a red circle moves to the left", height=32, width=32, num_frames=17, num_inference_steps=2,
                 guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]
    assert video.shape == (17, 32, 32, 3) and np.isfinite(video).all()
    from megatron_wan.models.wan21.config import preset

    assert tuple(pipe.transformer.config.patch_size) == preset("world").patch_size
    assert pipe.vae.config.scale_factor_spatial == 4


def test_vae_round_trip_keeps_what_test_clips_show():
    """64 new `test` clips (a seed the VAE never saw), encoded (posterior mode) and decoded by the base's VAE: the
    world metrics read every attribute right on at least 98% of them."""
    from diffusers import AutoencoderKLWan

    from data_tools.world import clip_rows, render
    from launch.world_vae import psnr, round_trip, to_model, to_uint8
    from megatron_wan.eval.world import score_frames

    rows = [r for r in clip_rows(420, seed=12345) if r["split"] == "test"][:64]
    assert len(rows) == 64
    frames = np.stack([render(r["shape"], r["colour"], r["x0"], r["y0"], r["side"], r["velocity"]) for r in rows])
    vae = AutoencoderKLWan.from_pretrained(BASE / "vae").eval()
    x = to_model(frames)
    rec = round_trip(vae, x)
    decoded = to_uint8(rec)
    scores = [score_frames(v, r) for v, r in zip(decoded, rows)]
    accuracy = {k: np.mean([s[f"{k}_ok"] for s in scores]) for k in ("colour", "shape", "direction")}
    print(f"VAE round trip of 64 test clips: PSNR {psnr(rec, x):.2f} dB, accuracies {accuracy}")
    assert min(accuracy.values()) >= 0.98, accuracy


def test_world_builder_runs_end_to_end_at_a_tiny_size(tmp_path):
    """launch.world at a tiny size (24 clips, 2 VAE steps, 2 DiT steps on 2 ranks, 2 prompts per split): every
    step's output exists, the base folder holds the trained transformer, and the table has Real, Random and Base."""
    from launch.world import main

    out = tmp_path / "world"
    main(["--out", str(out), "--videos", "24", "--vae-steps", "2", "--dit-steps", "2", "--workers", "1",
          "--prompts", "2", "--seeds", "0", "--train-override", "run.batch_size=2"])
    result = json.loads((out / "summary.json").read_text())
    assert set(result["groups"]) == {f"{s}/{g}" for s in ("train", "test") for g in ("Real", "Random", "Base")}
    assert result["groups"]["train/Real"]["accuracy"] == 1.0  # the real clips read as drawn
    assert all(s["videos"] == 2 for k, s in result["groups"].items() if k.endswith("Real"))
    assert all(s["videos"] == 2 for k, s in result["groups"].items() if not k.endswith("Real"))
    for trained in (out / "export" / "transformer").iterdir():
        assert trained.read_bytes() == (out / "base" / "transformer" / trained.name).read_bytes()
    samples = [json.loads(line) for line in (out / "eval" / "test" / "Base" / "samples.jsonl").read_text().splitlines()]
    assert {"path", "caption", "shape", "colour", "direction", "seed", "split"} <= set(samples[0])
    assert "| test | Base |" in (out / "summary.md").read_text()
