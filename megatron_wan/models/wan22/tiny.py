"""Tiny, randomly initialized Wan 2.2 pipeline folders (diffusers layout), for tests and the CPU demo.

The real classes on tiny configs, saved with `save_pretrained`: WanPipeline with `transformer` (high-noise expert),
`transformer_2` (low-noise) and `boundary_ratio` for T2V-A14B; WanImageToVideoPipeline with both experts and no
image encoder for I2V-A14B; WanPipeline with `expand_timesteps=True` and the Wan 2.2 VAE (z_dim 48, residual
blocks, patch 2, 16x spatial compression) for TI2V-5B, whose folder `WanImageToVideoPipeline` also loads.
"""

import json
from pathlib import Path

import torch

from megatron_wan.models.wan21.adapter import config_to_diffusers
from megatron_wan.models.wan21.tiny import save_tiny, tiny_components
from megatron_wan.models.wan22.config import BOUNDARY_RATIOS, ORIGINAL_FOLDERS, preset

TINY_PRESETS = {"t2v-a14b": "tiny-wan2.2-t2v-a14b", "i2v-a14b": "tiny-wan2.2-i2v-a14b", "ti2v": "tiny-wan2.2-ti2v"}


def tiny_vae22(seed: int = 0):
    """A tiny AutoencoderKLWan shaped like Wan 2.2's (z_dim 48, residual, patch 2, 16x / 4x), random latents stats."""
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(seed + 1)
    mean = (0.5 * torch.randn(48, generator=g)).tolist()
    std = (0.5 + torch.rand(48, generator=g)).tolist()
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                            latents_mean=mean, latents_std=std).eval()


def tiny_pipeline(task: str = "t2v-a14b", seed: int = 0):
    """diffusers' pipeline of a tiny random Wan 2.2 `task` ('t2v-a14b', 'i2v-a14b' or 'ti2v')."""
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    if task not in TINY_PRESETS:
        raise ValueError(f"task: expected one of {sorted(TINY_PRESETS)}, found {task!r}")
    name = TINY_PRESETS[task]
    cfg = preset(name)
    parts = tiny_components("t2v", seed)  # umT5, tokenizer, Wan 2.1 VAE, scheduler, one transformer (replaced)
    torch.manual_seed(seed)
    parts["transformer"] = WanTransformer3DModel(**config_to_diffusers(cfg)).eval()
    ratio = BOUNDARY_RATIOS[name]
    if ratio is not None:
        parts["transformer_2"] = WanTransformer3DModel(**config_to_diffusers(cfg)).eval()
        parts["boundary_ratio"] = ratio
    if cfg.expand_timesteps:
        parts["vae"] = tiny_vae22(seed)
        parts["expand_timesteps"] = True
    cls = WanImageToVideoPipeline if cfg.is_i2v else WanPipeline
    return cls(**parts)


def write_original_transformers(pipeline_dir, directory) -> Path:
    """The transformers of a (tiny) diffusers Wan 2.2 folder in the original Wan-AI layout at `directory`:
    high_noise_model/ and low_noise_model/ for A14B, the top folder for TI2V-5B; each a config.json and one
    safetensors file (the original folders' encoders and VAE are not written)."""
    from safetensors.torch import save_file

    from megatron_wan.models.wan21.adapter import from_ours, to_ours
    from megatron_wan.models.wan22.adapter import _open_folder, config_to_original, folder_info

    directory = Path(directory)
    info = folder_info(pipeline_dir)
    for expert in info.experts or (None,):
        src, cfg, _ = _open_folder(Path(pipeline_dir), expert, "diffusers")
        out = directory / ORIGINAL_FOLDERS[expert] if expert else directory
        out.mkdir(parents=True, exist_ok=True)
        weights = from_ours(to_ours(src, cfg, "diffusers"), cfg, "original")
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "diffusion_pytorch_model.safetensors"))
        (out / "config.json").write_text(json.dumps({"_class_name": "WanModel", **config_to_original(cfg)}))
    return directory


def write_tiny(directory, task: str = "t2v-a14b", seed: int = 0) -> Path:
    """Save a tiny random Wan 2.2 pipeline folder (diffusers layout) at `directory`; an existing one is kept."""
    return save_tiny(directory, tiny_pipeline, task, seed, "Wan 2.2")
