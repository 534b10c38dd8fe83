"""The frozen encoders of a Wan 2.2 folder (diffusers layout), as diffusers' Wan pipelines use them.

umT5 and the video latent are Wan 2.1's (`WanEncoders`), the latent geometry read from the folder's VAE: Wan 2.1's
VAE for A14B (16 channels, 8x / 4x), Wan 2.2's for TI2V-5B (48 channels, residual, patch 2: 16x / 4x, its own
latents_mean / latents_std). Image conditioning has no CLIP encoder in Wan 2.2:
- I2V-A14B: the channel condition of Wan 2.1 I2V, first-frame mask + latent of [image, zeros...] (20 channels).
- TI2V-5B (`expand_timesteps`): the normalized latent of the image alone [48, 1, H', W'], which replaces the first
  latent frame, whose tokens get timestep 0 (WanImageToVideoPipeline.prepare_latents with expand_timesteps).
"""

from pathlib import Path

import torch

from megatron_wan.models.wan21.conditioner import DTYPES, TEXT_LEN, WanEncoders, pad_text
from megatron_wan.models.wan22.adapter import folder_info

COMPONENTS = ("tokenizer", "text_encoder", "vae")  # both tasks: Wan 2.2 has no image encoder

__all__ = ["COMPONENTS", "DTYPES", "TEXT_LEN", "Wan22Encoders", "folder_task", "is_wan22_folder", "pad_text"]


def is_wan22_folder(model_dir) -> bool:
    """Whether `model_dir` is a Wan 2.2 diffusers folder: two experts with a boundary, or per-token timesteps."""
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        return False
    info = folder_info(model_dir)
    return bool(info.experts) or info.expand_timesteps


def folder_task(model_dir) -> str:
    """'i2v' for an I2V-A14B folder (WanImageToVideoPipeline), else 't2v' (TI2V-5B does both: pass the task)."""
    from megatron_wan.models.wan22.adapter import _index

    return "i2v" if _index(Path(model_dir)).get("_class_name") == "WanImageToVideoPipeline" else "t2v"


class Wan22Encoders(WanEncoders):
    """umT5 and the VAE of the Wan 2.2 folder `model_dir`; `task` 'i2v' adds the image conditioning (see the
    module); the rest as WanEncoders."""

    def __init__(self, model_dir, task: str | None = None, device="cpu", dtype=torch.float32, offload: bool = False,
                 components: tuple | None = None):
        self.expand_timesteps = folder_info(model_dir).expand_timesteps
        super().__init__(model_dir, task or folder_task(model_dir), device, dtype, offload,
                         COMPONENTS if components is None else components)

    def identity(self) -> dict:
        identity = super().identity()
        identity["configs"] = {c: v for c, v in identity["configs"].items() if c in COMPONENTS}
        return identity

    @torch.no_grad()
    def first_frame_latent(self, image) -> torch.Tensor:
        """TI2V's condition: the normalized VAE latent [z_dim, 1, H', W'] of a PIL image at its size."""
        width, height = image.size
        pixels = self.video_processor.preprocess(image, height=height, width=width).unsqueeze(2)
        return self._encode(pixels, False, None)[0].to(self.dtype)

    @torch.no_grad()
    def image_conditioning(self, image, frames: int) -> tuple[None, torch.Tensor]:
        """(None: no CLIP tokens, the condition latent) of a PIL image for a `frames`-frame video at its size:
        TI2V's first-frame latent, or I2V-A14B's mask and latent."""
        if self.expand_timesteps:
            return None, self.first_frame_latent(image)
        return None, self.mask_and_latent(image, frames)


def first_frame_timesteps(t: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """TI2V image-to-video per-token timesteps [B, f*h*w] of per-sample `t` [B] on a token grid (f, h, w): 0 on the
    first latent frame's tokens, t elsewhere (WanImageToVideoPipeline with expand_timesteps)."""
    f, h, w = grid
    mask = torch.ones(f, h * w, dtype=t.dtype, device=t.device)
    mask[0] = 0
    return t[:, None] * mask.flatten()[None]
