"""Sampling Wan 2.2 on WanModel equals diffusers' pipelines on tiny random folders written by save_pretrained:
WanPipeline with both A14B experts (the boundary crossed inside the schedule, different guidance scales),
WanImageToVideoPipeline for I2V-A14B, and TI2V-5B in text-to-video (WanPipeline) and image-to-video
(WanImageToVideoPipeline with expand_timesteps: per-token timesteps, the first frame replaced); CP=2 equals one
process."""

import json

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image
from wan_reference import rel_err

from megatron_wan import parallel
from megatron_wan.models.wan22.experts import ExpertPair
from megatron_wan.parallel.local import run_local
from megatron_wan.sampling import SamplingConfig, WanSampler

PROMPT, NEGATIVE = "a white rabbit walks in a green meadow", "dark blurry still"
FRAMES, SEEDS, STEPS, SHIFT = 9, (3, 11), 4, 3.0
GUIDANCE, GUIDANCE_2 = 5.0, 2.0
# (folder, task): pixel size (latent 3 x 4 x 6 for both VAEs: Wan 2.1's /8, Wan 2.2's /16), pipeline class
CASES = {
    ("t2v-a14b", "t2v"): ((32, 48), WanPipeline),
    ("i2v-a14b", "i2v"): ((32, 48), WanImageToVideoPipeline),
    ("ti2v", "t2v"): ((64, 96), WanPipeline),
    ("ti2v", "i2v"): ((64, 96), WanImageToVideoPipeline),
}


def _image(height, width) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _config(two_experts: bool) -> SamplingConfig:
    return SamplingConfig("unipc", STEPS, SHIFT, GUIDANCE, NEGATIVE,
                          guidance_scale_2=GUIDANCE_2 if two_experts else None)


def _ours(sampler: WanSampler, size) -> torch.Tensor:
    height, width = size
    image = _image(height, width) if sampler.task == "i2v" else None
    cond = sampler.conditions(PROMPT, FRAMES, image)
    config = _config(isinstance(sampler.model, ExpertPair))
    return sampler.sample(cond, sampler.latent_shape(FRAMES, height, width), SEEDS, config)


@pytest.fixture(scope="module")
def samplers(wan22_models):
    return {case: WanSampler(wan22_models[case[0]], task=case[1]) for case in CASES}


@pytest.mark.parametrize("case", list(CASES), ids=["-".join(c) for c in CASES])
def test_latents_equal_the_diffusers_pipeline(wan22_models, samplers, case):
    (height, width), cls = CASES[case]
    pipe = cls.from_pretrained(wan22_models[case[0]])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             flow_shift=SHIFT)
    two = pipe.config.boundary_ratio is not None
    extra = {"image": _image(height, width)} if cls is WanImageToVideoPipeline else {}
    if two:
        extra["guidance_scale_2"] = GUIDANCE_2
        pipe.scheduler.set_timesteps(STEPS)
        ts = pipe.scheduler.timesteps
        boundary = pipe.config.boundary_ratio * 1000
        assert (ts >= boundary).any() and (ts < boundary).any()  # both experts denoise some steps
    want = pipe(prompt=[PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, num_frames=FRAMES, height=height, width=width,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=[torch.Generator().manual_seed(s)
                                                                               for s in SEEDS],
                output_type="latent", **extra).frames
    sampler = samplers[case]
    assert isinstance(sampler.model, ExpertPair) == two
    ours = _ours(sampler, (height, width))
    err = rel_err(ours, want)
    print(f"\n{'/'.join(case)}: latents relative error {err:.2e}")
    assert ours.shape == want.shape == (2, sampler.model.wan.out_dim, 3, 4, 6) and err < 1e-5
    assert rel_err(ours[0], ours[1]) > 0.1  # one seed per sample
    if case == ("ti2v", "i2v"):  # the first latent frame is the image's
        image_latent = sampler.conditions(PROMPT, FRAMES, _image(height, width)).cond
        assert torch.equal(ours[:, :, :1], image_latent.expand(2, -1, -1, -1, -1))


def test_the_experts_and_their_guidance_scales_both_matter(samplers):
    """Swapping the experts or changing the low-noise expert's scale changes the latents."""
    sampler = samplers[("t2v-a14b", "t2v")]
    size = CASES[("t2v-a14b", "t2v")][0]
    base = _ours(sampler, size)
    pair = sampler.model
    sampler.model = ExpertPair(pair.low_noise, pair.high_noise, pair.boundary_ratio)
    try:
        assert rel_err(_ours(sampler, size), base) > 1e-3
    finally:
        sampler.model = pair
    cond = sampler.conditions(PROMPT, FRAMES)
    other = SamplingConfig("unipc", STEPS, SHIFT, GUIDANCE, NEGATIVE, guidance_scale_2=GUIDANCE)
    assert rel_err(sampler.sample(cond, sampler.latent_shape(FRAMES, *size), SEEDS, other), base) > 1e-3


def _cp_worker(folders):
    parallel.initialize(context_parallel=2)
    return {case: _ours(WanSampler(folders[case[0]], task=case[1]), CASES[case][0])
            for case in (("i2v-a14b", "i2v"), ("ti2v", "i2v"))}


def test_context_parallel_sampling_equals_one_process(wan22_models, samplers):
    """3 latent frames over CP=2: rank 0 holds the first frame (TI2V's image), rank 1 one frame and padding."""
    ranks = run_local(_cp_worker, 2, dict(wan22_models))
    for case in ranks[0]:
        want = _ours(samplers[case], CASES[case][0])
        for rank in ranks:
            print(f"\n{'/'.join(case)} CP=2 vs CP=1: relative error {rel_err(rank[case], want):.2e}")
            assert rel_err(rank[case], want) < 1e-5


def _decoded_frames(path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(c.streams.video[0]))


def test_generate_and_eval_sample_run_both_experts(wan22_models, tmp_path):
    """`data_tools generate` and `eval sample` on the tiny T2V-A14B folder, with both guidance scales."""
    from data_tools.__main__ import main as data_tools
    from data_tools.stage import read_jsonl
    from megatron_wan.eval.__main__ import main as evaluate

    (height, width), _ = CASES[("t2v-a14b", "t2v")]
    image = tmp_path / "ref.png"
    _image(height, width).save(image)
    gt = {"id": "gt0", "prompt": PROMPT, "width": width, "height": height, "frames": FRAMES, "fps": 16.0,
          "image": str(image)}
    (tmp_path / "gt.jsonl").write_text(json.dumps(gt) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"id": "p0", "prompt": PROMPT, "image": str(image)}) + "\n")
    common = ["--steps", "2", "--guidance-scale", str(GUIDANCE), "--guidance-scale-2", str(GUIDANCE_2)]
    data_tools(["generate", "--in", str(tmp_path / "gt.jsonl"), "--out", str(tmp_path / "generated"), "--model",
                str(wan22_models["t2v-a14b"]), "--samples", "1", "--preset", "ultrafast", *common])
    (record,) = read_jsonl(tmp_path / "generated" / "manifest.jsonl")
    assert record["gt_id"] == "gt0" and _decoded_frames(record["path"]) == FRAMES
    counts = evaluate(["sample", "--model", str(wan22_models["t2v-a14b"]), "--pairs", str(tmp_path / "pairs.jsonl"),
                       "--out", str(tmp_path / "eval"), "--frames", str(FRAMES), *common])
    assert counts == {"Base": 1}
    (video,) = (tmp_path / "eval" / "Base").glob("*.mp4")
    assert _decoded_frames(video) == FRAMES
