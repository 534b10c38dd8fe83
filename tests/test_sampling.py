"""Sampling on WanModel against diffusers' WanPipeline / WanImageToVideoPipeline (tiny random weights, Euler and
UniPC with a shift, CFG with a negative prompt, two seeds), CP=2 against one process, original-layout weights, and
the generate job on a real GT record: decodable 81-frame 16 fps videos, resumed after a kill without duplicates,
consumed by pair."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image
from safetensors.torch import save_file
from wan_reference import rel_err

from data_tools.__main__ import main
from data_tools.stage import read_journal, read_jsonl
from megatron_wan import parallel
from megatron_wan.models.wan21.adapter import config_to_original, from_ours
from megatron_wan.parallel.context_parallel import FrameShard
from megatron_wan.parallel.local import run_local
from megatron_wan.sampling import SamplingConfig, WanSampler

REPO = Path(__file__).parent.parent
PROMPT, NEGATIVE = "a white rabbit walks in a green meadow", "dark blurry still"
FRAMES, HEIGHT, WIDTH = 9, 32, 48  # latent 3 x 4 x 6: CP=2 holds 2 + 1 frames (+1 of padding)
SEEDS = (3, 11)
STEPS, SHIFT, GUIDANCE = 3, 3.0, 5.0


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def _ours(sampler: WanSampler, solver: str) -> torch.Tensor:
    cond = sampler.conditions(PROMPT, FRAMES, _image() if sampler.task == "i2v" else None)
    config = SamplingConfig(solver, STEPS, SHIFT, GUIDANCE, NEGATIVE)
    return sampler.sample(cond, sampler.latent_shape(FRAMES, HEIGHT, WIDTH), SEEDS, config)


@pytest.fixture(scope="module")
def samplers(models):
    return {task: WanSampler(models[task]) for task in ("t2v", "i2v")}


@pytest.mark.parametrize("solver", ["euler", "unipc"])
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_latents_and_frames_equal_the_diffusers_pipeline(models, samplers, task, solver):
    pipe = (WanImageToVideoPipeline if task == "i2v" else WanPipeline).from_pretrained(models[task])
    pipe.set_progress_bar_config(disable=True)
    if solver == "euler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    else:
        pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=SHIFT)
    last = {}

    def keep_latents(pipe, i, t, tensors):
        last.update(tensors)
        return tensors

    image = {"image": _image()} if task == "i2v" else {}
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    frames = pipe(prompt=[PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators, output_type="np",
                  callback_on_step_end=keep_latents, **image).frames
    ours = _ours(samplers[task], solver)
    err, worst = rel_err(ours, last["latents"]), (ours - last["latents"]).abs().max().item()
    print(f"\n{task} {solver}: latents relative error {err:.2e}, max |diff| {worst:.2e}")
    assert ours.shape == (2, 16, 3, 4, 6) and err < 1e-5
    assert rel_err(ours[0], ours[1]) > 0.1  # one seed per sample
    pixels = samplers[task].decode(ours)
    assert pixels.shape == (2, FRAMES, HEIGHT, WIDTH, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels - frames * 255).max() < 1.0  # the pipeline's float frames, rounded


def _cp_worker(folder):
    parallel.initialize(context_parallel=2)
    return _ours(WanSampler(folder), "unipc")


def test_context_parallel_sampling_equals_one_process(models, samplers):
    """I2V: the cond latent is sharded along with the noise; 3 latent frames give rank 1 a padded frame."""
    want = _ours(samplers["i2v"], "unipc")
    for rank in run_local(_cp_worker, 2, models["i2v"]):
        print(f"\nCP=2 vs CP=1: relative error {rel_err(rank, want):.2e}")
        assert rel_err(rank, want) < 1e-5


def test_original_layout_weights_and_refusals(models, samplers, tmp_path):
    ours = samplers["t2v"].model
    original = from_ours(ours.state_dict(), ours.wan, "original")
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config_to_original(ours.wan)))
    loaded = WanSampler(models["t2v"], transformer=tmp_path, layout="original")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.parameters(), ours.parameters(), strict=True))
    with pytest.raises(ValueError, match="a t2v transformer, but the encoders .* are i2v's"):
        WanSampler(models["i2v"], transformer=tmp_path, layout="original")
    with pytest.raises(ValueError, match="layout 'original': expected 'diffusers', or 'original' with a transformer"):
        WanSampler(models["t2v"], layout="original")
    with pytest.raises(ValueError, match="80 frames: Wan 2.1 needs 4k"):
        samplers["t2v"].latent_shape(80, 64, 112)
    with pytest.raises(ValueError, match="shard of token grid"):
        ours(torch.zeros(1, 16, 2, 4, 6), 0, torch.zeros(1, 4, 32), gather_output=False, shard=FrameShard((3, 2, 3), 1))


def _decoded(path) -> tuple:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return len(frames), float(stream.average_rate), stream.width, stream.height, frames


def test_generate_is_killed_resumes_without_duplicates_and_feeds_pair(pairs, models, tmp_path):
    (gt,) = [r for r in read_jsonl(pairs / "normalize" / "manifest.jsonl") if r["id"] == "bbb0"]
    bad = {**gt, "id": "odd", "width": 100}
    source = tmp_path / "gt.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in (gt, bad)))
    out = tmp_path / "generated"
    args = ["generate", "--in", str(source), "--model", str(models["i2v"]), "--samples", "2", "--steps", "2",
            "--preset", "ultrafast"]
    proc = subprocess.Popen([sys.executable, "-m", "data_tools", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    journal = out / "journal.jsonl"
    deadline = time.time() + 120
    while not (journal.exists() and journal.read_text().count("\n")) and time.time() < deadline and \
            proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # after the first video, while the second is being made
    proc.wait()
    (first,) = [p for p in (out / "videos").iterdir() if not p.name.startswith(".")]
    kept = first.stat().st_ino, first.stat().st_mtime_ns
    assert not (out / "manifest.jsonl").exists()

    summary = main([*args, "--out", str(out)])
    assert summary == {"stage": "generate", "shard": "0/1", "inputs": 2, "videos": 2, "rejected": 1,
                       "already_done": 1}
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept  # not made again
    records = read_jsonl(out / "manifest.jsonl")
    assert [r["id"] for r in records] == ["bbb0.i2v.0", "bbb0.i2v.1"]
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["bbb0.i2v.0.mp4", "bbb0.i2v.1.mp4"]
    assert sorted(e["id"] for e in read_journal(journal)) == ["bbb0.i2v.0", "bbb0.i2v.1", "odd"]
    (reject,) = read_jsonl(out / "rejects.jsonl")
    assert reject["id"] == "odd" and "100x64: both sides must be multiples of 16" in reject["reason"]
    videos = []
    for r in records:
        assert (r["gt_id"], r["generator"], r["prompt"], r["image"]) == ("bbb0", "i2v", gt["prompt"], gt["image"])
        assert (r["frames"], r["fps"], r["width"], r["height"]) == (81, 16.0, 112, 64)
        count, fps, width, height, frames = _decoded(r["path"])
        assert (count, fps, width, height) == (81, 16.0, 112, 64)
        videos.append(frames)
    assert records[0]["seed"] != records[1]["seed"] and not np.array_equal(*videos)

    split = main([*args, "--out", str(tmp_path / "split"), "--shard", "1/2"])  # the odd record alone
    assert (split["inputs"], split["videos"], split["rejected"]) == (1, 0, 1)
    assert read_jsonl(tmp_path / "split" / "rejects.1-of-2.jsonl")[0]["id"] == "odd"

    paired = main(["pair", "--in", str(source), "--generated", str(out), "--out", str(tmp_path / "pairs"),
                   "--test-fraction", "0"])
    assert paired["gt_pairs"] == 2
    losers = [p["loser"]["id"] for p in read_jsonl(tmp_path / "pairs" / "manifest.jsonl")]
    assert losers == ["bbb0.i2v.0", "bbb0.i2v.1"]
