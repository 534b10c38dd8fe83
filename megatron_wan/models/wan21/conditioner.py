"""The frozen encoders of a Wan 2.1 folder (diffusers layout), used as diffusers' Wan pipelines use them.

- text: umT5 last hidden state of the cleaned prompt, trimmed to its real token count (`WanPipeline` pads the
  trimmed states back to 512 with zeros; `pad_text` does that at load time).
- video: the VAE latent (posterior mean, or a sample) normalized as (z - latents_mean) / latents_std.
- I2V: CLIP vision penultimate hidden states of the reference image, and the 20-channel condition latent
  (4-channel first-frame mask + the VAE latent of [image, zeros...]) of `WanImageToVideoPipeline`.

The latent geometry (channels, strides, frame-count rule) is read from the VAE's own config (`latent_geometry`).
Each encoder sits on `offload_device` and visits `device` only while it runs, when offloading is on.
"""

import contextlib
import functools
import hashlib
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_wan.models.wan21.config import WanConfig

TEXT_LEN = 512  # Wan's umT5 context length
FPS = 16  # Wan 2.1's frame rate: what it was trained on and samples at
COMPONENTS = {"t2v": ("tokenizer", "text_encoder", "vae"),
              "i2v": ("tokenizer", "text_encoder", "vae", "image_encoder", "image_processor")}
IMAGE_FIELDS = ("clip_emb", "cond_latent")  # what an I2V sample stores besides latent and text_emb


@dataclass(frozen=True)
class LatentGeometry:
    """How videos map onto a DiT's latents: the VAE's channels and strides, the DiT's patch and the frame rate.

    A video of 1 + temporal_stride*k frames becomes 1 + k latent frames; each side shrinks by spatial_stride
    and must divide by spatial_stride x the patch's side."""

    channels: int  # VAE z_dim
    temporal_stride: int  # frames per latent frame (after the first)
    spatial_stride: int  # pixels per latent, each side
    patch: tuple  # the DiT's (t, h, w) patch
    fps: int
    family: str = "Wan 2.1"  # named in the errors

    @property
    def side_multiple(self) -> int:
        """What both pixel sides must divide by."""
        return self.spatial_stride * max(self.patch[1:])

    def problem(self, frames: int, height: int, width: int) -> str | None:
        """Why a `frames` x `height` x `width` video cannot be encoded and denoised, or None."""
        if frames < 1 or (frames - 1) % self.temporal_stride:
            return f"{frames} frames: {self.family} needs {self.temporal_stride}k+1 (81 after normalize)"
        if height % self.side_multiple or width % self.side_multiple:
            return (f"{width}x{height}: both sides must be multiples of {self.side_multiple} (VAE /"
                    f"{self.spatial_stride}, patch /{max(self.patch[1:])})")
        return None

    def latent_frames(self, frames: int) -> int:
        """Latent frames of `frames` video frames (1 + k for 1 + stride*k; others round up)."""
        return 1 + -(-(frames - 1) // self.temporal_stride)

    def frames(self, latent_frames: int) -> int:
        """Video frames of `latent_frames` latent frames."""
        return 1 + self.temporal_stride * (latent_frames - 1)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, F', H', W') of a video; ValueError when it has a size `problem` names."""
        why = self.problem(frames, height, width)
        if why:
            raise ValueError(why)
        return self.channels, self.latent_frames(frames), height // self.spatial_stride, width // self.spatial_stride


@functools.cache
def _vae_defaults() -> dict:
    """diffusers' AutoencoderKLWan defaults: the Wan 2.1 VAE's config."""
    from diffusers import AutoencoderKLWan

    return {name: p.default for name, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def latent_geometry(vae_config: Mapping | str | Path | None = None, config: WanConfig | None = None,
                    fps: int = FPS) -> LatentGeometry:
    """The geometry of a VAE config (AutoencoderKLWan's: z_dim, scale_factor_temporal, scale_factor_spatial), a
    folder holding one (a pipeline's or its vae/), or by default the Wan 2.1 VAE's, for the DiT `config` (its
    patch; default: WanConfig's)."""
    if isinstance(vae_config, (str, Path)):
        folder = Path(vae_config)
        path = folder / "vae" / "config.json" if (folder / "vae").is_dir() else folder / "config.json"
        vae_config = json.loads(path.read_text())
    vae = {**_vae_defaults(), **dict(vae_config or {})}  # (a diffusers FrozenDict config is a dict too)
    temporal = vae.get("scale_factor_temporal") or 2 ** sum(vae["temperal_downsample"])
    spatial = vae.get("scale_factor_spatial") or 2 ** len(vae["temperal_downsample"])
    patch = (config or WanConfig).patch_size
    return LatentGeometry(int(vae["z_dim"]), int(temporal), int(spatial), tuple(patch), fps)


def pad_text(text_emb: torch.Tensor, length: int = TEXT_LEN) -> torch.Tensor:
    """[L, D] trimmed text states -> [length, D], zero-padded as WanPipeline pads them."""
    if text_emb.shape[0] > length:
        raise ValueError(f"text embedding has {text_emb.shape[0]} tokens, more than the model's {length}")
    return torch.cat([text_emb, text_emb.new_zeros(length - text_emb.shape[0], text_emb.shape[1])])


def claims(folder) -> bool:
    """Whether `folder` is a Wan 2.1 pipeline folder (diffusers layout): one transformer, no per-token timesteps
    (what Wan 2.2's pipelines add: transformer_2, expand_timesteps)."""
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        return (Path(folder) / "vae").is_dir()
    index = json.loads(index_file.read_text())
    return index.get("transformer_2") in (None, [None, None]) and not index.get("expand_timesteps")


def folder_task(model_dir) -> str:
    """'i2v' when the folder has an image encoder, else 't2v'."""
    return "i2v" if (Path(model_dir) / "image_encoder").is_dir() else "t2v"


class WanEncoders:
    """umT5, the Wan VAE and (I2V) CLIP from `model_dir`, in `dtype`, run on `device`; `components` (default: the
    task's) loads only some, e.g. ("vae",) to decode."""

    def __init__(self, model_dir, task: str | None = None, device="cpu", dtype=torch.float32, offload: bool = False,
                 components: tuple | None = None):
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

        self.model_dir = Path(model_dir)
        self.task = task or folder_task(model_dir)
        wanted = COMPONENTS[self.task] if components is None else tuple(components)
        missing = [c for c in wanted if not (self.model_dir / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{self.model_dir}: {self.task} encoding needs the diffusers subfolders "
                                    f"{list(wanted)}; missing {missing}")
        self.device, self.dtype, self.offload = torch.device(device), dtype, offload
        self.offload_device = torch.device("cpu") if offload else self.device
        load = dict(torch_dtype=dtype)

        def maybe(name, loader, **kwargs):
            return loader.from_pretrained(self.model_dir / name, **kwargs) if name in wanted else None

        self.tokenizer = maybe("tokenizer", AutoTokenizer)
        self.text_encoder = maybe("text_encoder", UMT5EncoderModel, **load)
        self.vae = maybe("vae", AutoencoderKLWan, **load)
        self.image_encoder = maybe("image_encoder", CLIPVisionModel, **load)
        self.image_processor = maybe("image_processor", CLIPImageProcessor)
        for m in self._modules():
            m.requires_grad_(False).eval().to(self.offload_device)
        if self.vae is not None:
            self.video_processor = VideoProcessor(vae_scale_factor=self.vae.spatial_compression_ratio)
            c = self.vae.config
            self.geometry = latent_geometry(c)
            self.latents_mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(1, c.z_dim, 1, 1, 1)
            self.latents_std = torch.tensor(c.latents_std, dtype=torch.float32).view(1, c.z_dim, 1, 1, 1)

    @property
    def needs_image(self) -> bool:
        """Whether this task conditions on a reference image besides the prompt."""
        return self.task == "i2v"

    def _modules(self):
        return [m for m in (self.text_encoder, self.vae, self.image_encoder) if m is not None]

    @contextlib.contextmanager
    def _on_device(self, module):
        module.to(self.device)
        try:
            yield module
        finally:
            if self.offload:
                module.to(self.offload_device)

    def model_fields(self) -> dict:
        """DiT config fields the pipeline folder sets beyond its transformer's config.json, for a transformer loaded
        apart from it (a trained one): none for Wan 2.1."""
        return {}

    def identity(self) -> dict:
        """What the encodings depend on: folder, task, dtype and a SHA-256 of each component's config."""
        def digest(path):
            files = sorted(p for p in Path(path).glob("*.json"))
            return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]

        return {"model": str(self.model_dir.resolve()), "task": self.task, "dtype": str(self.dtype).split(".")[-1],
                "configs": {c: digest(self.model_dir / c) for c in COMPONENTS[self.task]}}

    def latent_normalization(self) -> dict:
        """The VAE's per-channel statistics the latents were normalized with."""
        return {"latents_mean": list(self.vae.config.latents_mean), "latents_std": list(self.vae.config.latents_std)}

    @torch.no_grad()
    def text(self, prompts: list[str]) -> list[torch.Tensor]:
        """umT5 states of each prompt, [real tokens, D] (cleaned and tokenized exactly as WanPipeline does)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=TEXT_LEN,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        lengths = tokens.attention_mask.gt(0).sum(dim=1)
        with self._on_device(self.text_encoder) as enc:
            states = enc(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)).last_hidden_state
        return [s[:n].to(self.dtype).cpu() for s, n in zip(states, lengths.tolist())]

    def _encode(self, pixels: torch.Tensor, sample: bool, generator) -> torch.Tensor:
        with self._on_device(self.vae) as vae:
            dist = vae.encode(pixels.to(self.device, self.dtype)).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
        return (z.float().cpu() - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def video(self, frames: np.ndarray, *, sample_posterior: bool = False, generator=None) -> torch.Tensor:
        """Normalized latent [z_dim, F', H', W'] of RGB uint8 frames [F, H, W, 3]."""
        pixels = self.video_processor.preprocess_video(frames.astype(np.float32) / 255.0)
        return self._encode(pixels, sample_posterior, generator)[0].to(self.dtype)

    @torch.no_grad()
    def image_conditioning(self, image, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip_emb [tokens, D], cond_latent [20, F', H', W']) of a PIL reference image for a `frames`-frame
        video at the image's size, as WanImageToVideoPipeline computes them."""
        clip_in = self.image_processor(images=image, return_tensors="pt").pixel_values
        with self._on_device(self.image_encoder) as enc:
            clip = enc(pixel_values=clip_in.to(self.device, self.dtype), output_hidden_states=True).hidden_states[-2]
        return clip[0].to(self.dtype).cpu(), self.cond_latent(image, frames)

    def image_pixels(self, image) -> torch.Tensor:
        """A PIL image as the VAE's input [1, 3, 1, H, W] at its own size, as the pipelines preprocess it."""
        width, height = image.size
        return self.video_processor.preprocess(image, height=height, width=width).unsqueeze(2)

    @torch.no_grad()
    def cond_latent(self, image, frames: int) -> torch.Tensor:
        """The 20-channel condition latent [20, F', H', W'] (4-channel first-frame mask + the VAE latent of
        [image, zeros...]) of a PIL reference image for a `frames`-frame video, as WanImageToVideoPipeline builds it."""
        pixels = self.image_pixels(image)
        video = torch.cat([pixels, pixels.new_zeros(1, 3, frames - 1, *pixels.shape[-2:])], dim=2)
        latent = self._encode(video, False, None)
        t = self.vae.config.scale_factor_temporal
        mask = torch.ones(1, 1, frames, *latent.shape[-2:])
        mask[:, :, 1:] = 0
        mask = torch.cat([mask[:, :, :1].repeat_interleave(t, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(1, -1, t, *latent.shape[-2:]).transpose(1, 2)
        return torch.cat([mask, latent], dim=1)[0].to(self.dtype)

    def image_fields(self, image, frames: int) -> dict:
        """The sample fields (IMAGE_FIELDS) of a reference image for a `frames`-frame video; {} for a task that
        takes none (then `image` is ignored)."""
        if not self.needs_image:
            return {}
        fields = zip(IMAGE_FIELDS, self.image_conditioning(image, frames))
        return {k: v for k, v in fields if v is not None}  # Wan 2.2: no CLIP tokens

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalized latents [B, z_dim, F', H', W'] -> RGB uint8 videos [B, F, H, W, 3] (the Wan VAE)."""
        z = latents.float().cpu() * self.latents_std + self.latents_mean
        with self._on_device(self.vae) as vae:
            video = vae.decode(z.to(self.device, self.dtype), return_dict=False)[0]
        frames = self.video_processor.postprocess_video(video.float().cpu(), output_type="np")
        return (frames * 255).round().astype(np.uint8)
