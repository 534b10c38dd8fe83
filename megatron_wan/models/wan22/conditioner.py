"""The frozen encoders of a Wan 2.2 folder (diffusers layout), as diffusers' Wan 2.2 pipelines use them.

umT5 and the VAE as for Wan 2.1 (A14B keeps Wan 2.1's VAE; TI2V-5B has the Wan 2.2 VAE, z_dim 48, whose latents the
same normalization applies to). Image-to-video has no CLIP image encoder in Wan 2.2:
- I2V-A14B: the 20-channel condition latent (4-channel first-frame mask + VAE latent of [image, zeros...])
  concatenated to the noisy latents, as for Wan 2.1;
- TI2V-5B: the VAE latent of the image alone [48, 1, H', W'], which replaces the first latent frame (timestep 0).
"""

import dataclasses
import json
from pathlib import Path

import torch

from megatron_wan.models.wan21.conditioner import LatentGeometry, WanEncoders
from megatron_wan.models.wan21.conditioner import latent_geometry as wan21_geometry

COMPONENTS = ("tokenizer", "text_encoder", "vae")  # both tasks: no image encoder in Wan 2.2
# the Wan 2.2 VAE's geometry (its diffusers config: z_dim 48, 16x spatial and 4x temporal compression), and the
# frame rates: A14B samples at Wan 2.1's 16 fps on Wan 2.1's VAE, TI2V-5B at 24 fps
VAE22 = {"z_dim": 48, "scale_factor_spatial": 16, "scale_factor_temporal": 4}
FPS_TI2V = 24


def latent_geometry(vae_config=None, config=None) -> LatentGeometry:
    """The geometry of a VAE config or folder (None: the VAE of `config`'s preset: TI2V-5B's 48-channel Wan 2.2 VAE,
    else Wan 2.1's) for the DiT `config`; TI2V-5B (per-token timesteps) at 24 fps."""
    ti2v = config is not None and config.expand_timesteps
    if vae_config is None and ti2v:
        vae_config = VAE22
    geometry = wan21_geometry(vae_config, config)
    return dataclasses.replace(geometry, fps=FPS_TI2V if ti2v else geometry.fps, family="Wan 2.2")


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
        if self.vae is not None:
            fps = FPS_TI2V if self.expand_timesteps else self.geometry.fps
            self.geometry = dataclasses.replace(self.geometry, fps=fps, family="Wan 2.2")

    def model_fields(self) -> dict:
        """TI2V-5B's per-token timesteps: a pipeline flag (model_index.json), not in the transformer's config."""
        return {"expand_timesteps": self.expand_timesteps}

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
