"""The frozen encoders of a Wan 2.2 folder (diffusers layout), as diffusers' Wan 2.2 pipelines use them.

umT5 and the VAE as for Wan 2.1 (A14B keeps Wan 2.1's VAE; TI2V-5B has the Wan 2.2 VAE, z_dim 48, whose latents the
same normalization applies to). Image-to-video has no CLIP image encoder in Wan 2.2:
- I2V-A14B: the 20-channel condition latent (4-channel first-frame mask + VAE latent of [image, zeros...])
  concatenated to the noisy latents, as for Wan 2.1;
- TI2V-5B: the VAE latent of the image alone [48, 1, H', W'], which replaces the first latent frame (timestep 0).
"""

import json
from pathlib import Path

import torch

from megatron_wan.models.wan21.conditioner import WanEncoders
from megatron_wan.models.wan22.adapter import folder_info

COMPONENTS = ("tokenizer", "text_encoder", "vae")  # both tasks: no image encoder in Wan 2.2


def is_wan22_folder(model_dir) -> bool:
    """Whether `model_dir` is a Wan 2.2 diffusers folder: two experts with a boundary, or per-token timesteps."""
    if not (Path(model_dir) / "model_index.json").is_file():
        return False
    info = folder_info(model_dir)
    return bool(info.experts) or info.expand_timesteps


def folder_task(model_dir) -> str:
    """'i2v' for an I2V-A14B folder (WanImageToVideoPipeline with a pair of experts), else 't2v' (TI2V-5B's
    folder does both; its default is text-to-video)."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    return "i2v" if index.get("_class_name") == "WanImageToVideoPipeline" and not index.get("expand_timesteps") \
        else "t2v"


class Wan22Encoders(WanEncoders):
    """umT5 and the VAE of a Wan 2.2 folder; `task='i2v'` on a TI2V-5B folder conditions on the first frame."""

    def __init__(self, model_dir, task: str | None = None, device="cpu", dtype=torch.float32, offload: bool = False,
                 components: tuple | None = None):
        super().__init__(model_dir, task or folder_task(model_dir), device, dtype, offload,
                         COMPONENTS if components is None else components)
        index = json.loads((self.model_dir / "model_index.json").read_text())
        self.expand_timesteps = bool(index.get("expand_timesteps"))

    def identity(self) -> dict:
        """WanEncoders' identity, over the components a Wan 2.2 folder has (no image encoder)."""
        identity = super().identity()
        identity["configs"] = {c: v for c, v in identity["configs"].items() if c in COMPONENTS}
        return identity

    @torch.no_grad()
    def first_frame_latent(self, image) -> torch.Tensor:
        """TI2V: the normalized VAE latent [z_dim, 1, H', W'] of a PIL image alone (WanImageToVideoPipeline with
        expand_timesteps)."""
        return self._encode(self.image_pixels(image), False, None)[0].to(self.dtype)

    @torch.no_grad()
    def image_conditioning(self, image, frames: int) -> tuple[None, torch.Tensor]:
        """(None: no CLIP tokens, the image condition): TI2V's first-frame latent, or I2V-A14B's 20-channel
        condition latent for a `frames`-frame video at the image's size."""
        if self.expand_timesteps:
            return None, self.first_frame_latent(image)
        return None, self.cond_latent(image, frames)
