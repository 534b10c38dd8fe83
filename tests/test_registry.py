"""The model-family registry: lookups, the conditioner's latent geometry read from the VAE's own config, and the
model's refusal to build without process groups."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_wan.models import FAMILIES, get_model_spec, spec_for_folder, spec_for_preset, task, task_names

REPO = Path(__file__).resolve().parents[1]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="known families: wan2.1"):
        get_model_spec("wan9")
    with pytest.raises(KeyError) as e:
        spec_for_preset("wan9-t2v")
    assert all(p in str(e.value) for p in ("wan2.1-t2v-1.3b", "wan2.1-i2v-14b-720p", "tiny", "tiny-i2v"))
    with pytest.raises(KeyError, match="its tasks: t2v, i2v"):
        get_model_spec("wan2.1").task("v2v")
    with pytest.raises(KeyError, match="known tasks: t2v, i2v"):
        task("v2v")


def test_every_preset_belongs_to_its_family_and_tasks_are_known():
    for name in FAMILIES:
        spec = get_model_spec(name)
        assert spec.name == name
        for preset in spec.presets:
            assert spec_for_preset(preset) is spec
            assert spec.config(preset).model_type in [t.name for t in spec.tasks]
    assert task_names() == ("t2v", "i2v") and task("i2v").image and not task("t2v").image


def _tiny_vae(folder: Path, z_dim: int = 16, **config) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    stats = dict(latents_mean=[0.1 * i for i in range(z_dim)], latents_std=[1.0 + 0.1 * i for i in range(z_dim)])
    vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, **stats, **config)
    vae.save_pretrained(folder / "vae")
    return folder


def _encoded_shape(folder: Path, frames: int, height: int, width: int):
    """(geometry, latent shape) of the family's conditioner on a random video, through the real VAE."""
    enc = get_model_spec("wan2.1").conditioner(folder, "t2v", components=("vae",))
    video = np.random.default_rng(0).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    return enc.geometry, tuple(enc.video(video).shape)


def test_geometry_is_read_from_the_vae_config(tmp_path):
    spec = get_model_spec("wan2.1")
    geometry, shape = _encoded_shape(_tiny_vae(tmp_path / "wan21"), 9, 32, 48)
    # the constants the callers hard-coded before: 16 channels, frames 4k+1, 8x8 pixels per latent, sides / 16
    assert (geometry.channels, geometry.temporal_stride, geometry.spatial_stride) == (16, 4, 8)
    assert geometry.side_multiple == 16 and geometry.fps == 16
    assert shape == geometry.latent_shape(9, 32, 48) == (16, 3, 4, 6)  # what AutoencoderKLWan itself gives
    assert spec.geometry() == geometry == spec.latent_geometry(tmp_path / "wan21")  # the default is that VAE
    assert geometry.problem(81, 480, 832) is None
    assert "4k+1" in geometry.problem(80, 480, 832) and "multiples of 16" in geometry.problem(81, 488, 832)

    other, shape = _encoded_shape(_tiny_vae(tmp_path / "other", z_dim=8, temperal_downsample=[False, False, True],
                                            scale_factor_temporal=2), 9, 32, 48)
    assert (other.channels, other.temporal_stride, other.spatial_stride) == (8, 2, 8)
    assert shape == other.latent_shape(9, 32, 48) == (8, 5, 4, 6)
    assert other.problem(10, 32, 48) is not None and other.problem(11, 32, 48) is None


def test_planner_geometry_is_the_vae_strides():
    from megatron_wan.bench.plan import Setup, longest_video

    setup = Setup()  # 200 frames at 1280x720 of Wan2.1-I2V-14B-720P
    assert setup.latent_grid() == (51, 90, 160)  # 1 + ceil(199 / 4), 720 / 8, 1280 / 8
    assert (longest_video(setup) - 1) % 4 == 0


def test_family_of_a_pipeline_folder(tmp_path):
    wan21 = tmp_path / "wan21"
    wan21.mkdir()
    (wan21 / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer_2": [None, None],
                                                         "boundary_ratio": None}))
    assert spec_for_folder(wan21) is get_model_spec("wan2.1")
    two = tmp_path / "two-experts"
    two.mkdir()
    (two / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                       "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    if len(FAMILIES) == 1:
        with pytest.raises(ValueError, match="no family recognizes"):
            spec_for_folder(two)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        spec_for_folder(tmp_path / "missing")


def test_model_refuses_to_build_without_process_groups():
    code = "from megatron_wan.models import spec_for_preset; spec_for_preset('tiny').build('tiny')"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: WanModel: no process groups") and "parallel.initialize" in last, last
