"""Wan 2.2 encoding against diffusers on tiny random folders written by `save_pretrained`: the TI2V-5B VAE's
latents (48 channels, residual, patch 2) equal AutoencoderKLWan's on the same frames, TI2V's first-frame condition
equals what WanImageToVideoPipeline builds with expand_timesteps, I2V-A14B's channel
condition equals its prepare_latents, and the geometry each VAE accepts comes from its config."""

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_wan.models.wan22.adapter import is_wan22_folder
from megatron_wan.models.wan22.conditioner import Wan22Encoders, folder_task


def _frames(f, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_ti2v_latents_equal_autoencoderklwan(wan22_models):
    from diffusers import AutoencoderKLWan

    folder = wan22_models["ti2v"]
    enc = Wan22Encoders(folder, "t2v")
    frames = _frames(9, 64, 96)
    ours = enc.video(frames)
    vae = AutoencoderKLWan.from_pretrained(folder / "vae").eval()
    assert (vae.config.z_dim, vae.config.is_residual, vae.config.patch_size) == (48, True, 2)
    pixels = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 48, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 48, 1, 1, 1)
    theirs = ((z - mean) / std)[0]
    assert ours.shape == theirs.shape == (48, 3, 4, 6)  # frames 1 + 4k -> 1 + k, sides / 16
    assert _rel(ours, theirs) < 1e-5


def test_ti2v_condition_equals_the_pipeline(wan22_models):
    from diffusers import WanImageToVideoPipeline

    folder = wan22_models["ti2v"]
    assert is_wan22_folder(folder) and folder_task(folder) == "t2v"
    image = Image.fromarray(_frames(1, 64, 96, seed=1)[0])
    ours = Wan22Encoders(folder, "i2v").image_conditioning(image, 9)
    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    assert pipe.config.expand_timesteps
    pixels = pipe.video_processor.preprocess(image, height=64, width=96).float()
    with torch.no_grad():
        _, condition, first_frame_mask = pipe.prepare_latents(pixels, 1, 48, 64, 96, 9, torch.float32, "cpu",
                                                              torch.Generator().manual_seed(0))
    assert ours[0] is None  # no CLIP tokens in Wan 2.2
    assert ours[1].shape == condition[0].shape == (48, 1, 4, 6)
    assert _rel(ours[1], condition[0]) < 1e-5
    assert first_frame_mask.shape[2:] == (3, 4, 6)  # the latent grid the condition replaces the first frame of


def test_i2v_a14b_condition_equals_the_pipeline(wan22_models):
    from diffusers import WanImageToVideoPipeline

    folder = wan22_models["i2v-a14b"]
    assert folder_task(folder) == "i2v"
    image = Image.fromarray(_frames(1, 64, 96, seed=2)[0])
    clip, ours = Wan22Encoders(folder).image_conditioning(image, 9)
    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    pixels = pipe.video_processor.preprocess(image, height=64, width=96).float()
    with torch.no_grad():
        _, condition = pipe.prepare_latents(pixels, 1, 16, 64, 96, 9, torch.float32, "cpu",
                                            torch.Generator().manual_seed(0))
    assert clip is None and ours.shape == condition[0].shape == (20, 3, 8, 12)
    assert _rel(ours, condition[0]) < 1e-5


@pytest.mark.parametrize("task, frames, height, width, problem", [
    ("ti2v", 9, 64, 96, None), ("ti2v", 9, 48, 96, "sides must be multiples of 32"),
    ("ti2v", 10, 64, 96, "needs 4k+1"), ("t2v-a14b", 9, 48, 80, None),
    ("t2v-a14b", 9, 40, 80, "sides must be multiples of 16"),
])
def test_geometry_comes_from_the_vae_config(wan22_models, task, frames, height, width, problem):
    found = Wan22Encoders(wan22_models[task], "t2v", components=("vae",)).geometry.problem(frames, height, width)
    assert found == problem if problem is None else problem in found


def test_normalize_formats():
    from data_tools.normalize import Spec, format_spec

    ti2v = format_spec("wan2.2-ti2v")
    assert (ti2v.fps, ti2v.frames, ti2v.size("16:9"), ti2v.size("9:16")) == (24, 121, (1280, 704), (704, 1280))
    assert all(side % 32 == 0 for a in ti2v.aspects for side in ti2v.size(a))  # TI2V-5B: VAE /16, patch /2
    assert format_spec("wan2.1") == Spec() and Spec().size("16:9") == (1280, 720)
    small = format_spec("wan2.2-ti2v", min_side=64, frames=9)
    # a given side: computed buckets, still with sides / 32 (16 would give 112 x 64, which TI2V-5B cannot take)
    assert (small.fps, small.frames, small.size("16:9"), small.size("9:16")) == (24, 9, (128, 64), (64, 128))
