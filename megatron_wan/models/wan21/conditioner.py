"""The frozen encoders of a Wan 2.1 folder (diffusers layout), used as diffusers' Wan pipelines use them.

- text: umT5 last hidden state of the cleaned prompt, trimmed to its real token count (`WanPipeline` pads the
  trimmed states back to 512 with zeros; `pad_text` does that at load time).
- video: the VAE latent (posterior mean, or a sample) normalized as (z - latents_mean) / latents_std.
- I2V: CLIP vision penultimate hidden states of the reference image, and the 20-channel condition latent
  (4-channel first-frame mask + the VAE latent of [image, zeros...]) of `WanImageToVideoPipeline`.

Each encoder sits on `offload_device` and visits `device` only while it runs, when offloading is on.
"""

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import torch

TEXT_LEN = 512  # Wan's umT5 context length
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # command-line names
COMPONENTS = {"t2v": ("tokenizer", "text_encoder", "vae"),
              "i2v": ("tokenizer", "text_encoder", "vae", "image_encoder", "image_processor")}


def pad_text(text_emb: torch.Tensor, length: int = TEXT_LEN) -> torch.Tensor:
    """[L, D] trimmed text states -> [length, D], zero-padded as WanPipeline pads them."""
    if text_emb.shape[0] > length:
        raise ValueError(f"text embedding has {text_emb.shape[0]} tokens, more than the model's {length}")
    return torch.cat([text_emb, text_emb.new_zeros(length - text_emb.shape[0], text_emb.shape[1])])


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
            self.latents_mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(1, c.z_dim, 1, 1, 1)
            self.latents_std = torch.tensor(c.latents_std, dtype=torch.float32).view(1, c.z_dim, 1, 1, 1)

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
        """Normalized latent [16, F', H', W'] of RGB uint8 frames [F, H, W, 3]."""
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

    def geometry_problem(self, frames: int, height: int, width: int, patch: int = 2) -> str | None:
        """Why `frames` frames of `width` x `height` cannot be encoded for this VAE and a transformer patch of
        `patch` (frames 1 + k x its temporal factor, sides multiples of its spatial factor x patch), or None."""
        c = self.vae.config
        side = c.scale_factor_spatial * patch
        if (frames - 1) % c.scale_factor_temporal:
            return f"{frames} frames; this VAE needs {c.scale_factor_temporal}k+1"
        if height % side or width % side:
            return (f"{width}x{height}: sides must be multiples of {side} (VAE /{c.scale_factor_spatial}, "
                    f"patch /{patch})")
        return None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalized latents [B, 16, F', H', W'] -> RGB uint8 videos [B, F, H, W, 3] (the Wan VAE)."""
        z = latents.float().cpu() * self.latents_std + self.latents_mean
        with self._on_device(self.vae) as vae:
            video = vae.decode(z.to(self.device, self.dtype), return_dict=False)[0]
        frames = self.video_processor.postprocess_video(video.float().cpu(), output_type="np")
        return (frames * 255).round().astype(np.uint8)
