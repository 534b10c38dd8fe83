"""Flow-matching sampling of Wan 2.1 on WanModel: diffusers' Euler and UniPC schedulers with the sigma shift
(sigma = shift*s / (1 + (shift-1)*s)), classifier-free guidance against a negative prompt, T2V and I2V, one seed
per sample, context parallel, VAE decode and MP4 output at the family's frame rate (Wan 2.1: 16 fps).

The loop is that of diffusers' WanPipeline / WanImageToVideoPipeline: the same noise for the same seeds, the same
timesteps, guidance and scheduler steps, hence the same latents. Under context parallelism (CP) each rank holds only
its own latent frames from the first step to the last (the model takes them as they are, `shard=`, and the
scheduler's update is elementwise); the frames are gathered once, after the loop, for the VAE decode.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_wan import parallel
from megatron_wan.models import spec_for_folder
from megatron_wan.models.wan21.conditioner import pad_text
from megatron_wan.models.wan22 import LOW_NOISE
from megatron_wan.models.wan22.experts import ExpertPair
from megatron_wan.objectives.pair_step import Conditions
from megatron_wan.parallel.context_parallel import FrameShard
from megatron_wan.video_io import encode_h264

# Wan 2.1's default negative prompt (sample_neg_prompt of its shared config; diffusers' examples use it too)
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
                       "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
                       "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
                       "杂乱的背景，三条腿，背景人很多，倒着走")
SOLVERS = ("unipc", "euler")


@dataclass(frozen=True)
class SamplingConfig:
    """Solver and guidance; the defaults are Wan 2.1's (50 UniPC steps, shift 5.0 at 720p, 3.0 at 480p; CFG 5.0).
    guidance_scale <= 1 turns classifier-free guidance off, as in diffusers. Wan 2.2 A14B: guidance_scale is the
    high-noise expert's, guidance_scale_2 the low-noise one's (None: the same), as WanPipeline takes them."""

    solver: str = "unipc"
    steps: int = 50
    shift: float = 5.0
    guidance_scale: float = 5.0
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    num_train_timesteps: int = 1000
    guidance_scale_2: float | None = None

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"sampling solver: expected one of {SOLVERS}, found {self.solver!r}")
        if self.steps < 1:
            raise ValueError(f"sampling steps: expected at least 1, found {self.steps}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1

    def scale(self, expert: str | None) -> float:
        """The guidance scale of a step denoised by `expert` (None: the only transformer)."""
        if expert == LOW_NOISE and self.guidance_scale_2 is not None:
            return self.guidance_scale_2
        return self.guidance_scale

    def scheduler(self):
        """A fresh diffusers scheduler: FlowMatchEulerDiscreteScheduler, or UniPCMultistepScheduler configured for
        flow prediction as Wan 2.1's diffusers folders configure it."""
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        if self.solver == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        return UniPCMultistepScheduler(num_train_timesteps=self.num_train_timesteps, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=self.shift)


def initial_noise(seeds, shape) -> torch.Tensor:
    """[len(seeds), *shape] float32 noise on the CPU, sample i drawn from torch.Generator().manual_seed(seeds[i]):
    what diffusers' pipelines draw from that list of CPU generators, so a seed gives one video on any device."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def gather_frames(x: torch.Tensor, shard: FrameShard) -> torch.Tensor:
    """Each CP rank's latent frames [B, C, k*p_t, H, W] -> the whole video's [B, C, F, H, W] on every rank."""
    if shard.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(shard.size)]
    dist.all_gather(parts, x.contiguous(), group=parallel.cp_group())
    return torch.cat(parts, dim=2)[:, :, : shard.grid[0] * shard.patch_t]


def _batched(t: torch.Tensor | None, b: int, name: str):
    if t is None or t.shape[0] == b:
        return t
    if t.shape[0] != 1:
        raise ValueError(f"sampling {name}: expected a batch of 1 or {b} (the seeds), found {t.shape[0]}")
    return t.expand(b, *t.shape[1:])


class FirstFrame:
    """Wan 2.2 TI2V image-to-video: the image's latent [B, C, 1, H, W] stands in for the first latent frame of the
    model's input and of the result, whose tokens get timestep 0 (WanImageToVideoPipeline with expand_timesteps)."""

    def __init__(self, image_latent: torch.Tensor, shard: FrameShard):
        self.image, self.shard = image_latent, shard
        f, h, w = shard.grid
        self.moving = torch.ones(f, h, w)  # 1 for the tokens that are denoised, 0 for the image's
        self.moving[0] = 0

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """This rank's latent frames with the first frame of the video replaced by the image's latent."""
        if self.shard.first_frame != 0:
            return latents
        return torch.cat([self.image.to(latents), latents[:, :, 1:]], dim=2)

    def timesteps(self, t: torch.Tensor, b: int) -> torch.Tensor:
        """Per-token timesteps [B, f*h*w] of the whole video: 0 on the first frame, t elsewhere."""
        return (self.moving.to(t.device) * t).flatten()[None].expand(b, -1)


@torch.no_grad()
def denoise(model, noise: torch.Tensor, cond: Conditions, negative_text: torch.Tensor | None,
            config: SamplingConfig) -> torch.Tensor:
    """Latents [B, C, F, H, W] sampled from `noise` (the whole video, the same on every CP rank) under `cond`
    (text [1 or B, L, text_dim]; Wan 2.1 I2V: clip and the 20-channel cond latent; Wan 2.2 I2V-A14B: the cond
    latent; TI2V: the first frame's latent [1 or B, C, 1, H, W] as `cond`) and, when guided, against
    `negative_text`; returned whole on every rank, each rank having stepped only its own frames. `model` is a
    WanModel or Wan 2.2's ExpertPair, whose expert of each step is chosen by its timestep, with its guidance
    scale (`SamplingConfig.scale`)."""
    if config.guided and negative_text is None:
        raise ValueError(f"sampling: guidance_scale={config.guidance_scale} needs the negative prompt's text_emb")
    experts = model if isinstance(model, ExpertPair) else None
    wan = model.wan
    b, patch = noise.shape[0], wan.patch_size
    shard = FrameShard.current(tuple(n // p for n, p in zip(noise.shape[2:], patch)), patch[0])
    text, clip = _batched(cond.text, b, "text_emb"), _batched(cond.clip, b, "clip_emb")
    negative = _batched(negative_text, b, "negative text_emb")
    first_frame = cond_frames = None
    if cond.cond is not None and wan.expand_timesteps:
        first_frame = FirstFrame(_batched(cond.cond, b, "first-frame latent"), shard)
    elif cond.cond is not None:
        cond_frames = shard.local_latents(_batched(cond.cond, b, "cond_latent"))
    dtype = (experts.high_noise if experts else model).patch_embedding.weight.dtype
    latents = shard.local_latents(noise.float())
    scheduler = config.scheduler()
    scheduler.set_timesteps(config.steps, device=noise.device)
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        current, scale = (experts.model(t), config.scale(experts.expert(t))) if experts else (model, config.scale(None))
        x, timestep = latents, t
        if first_frame is not None:
            x, timestep = first_frame.apply(latents), first_frame.timesteps(t, b)
        x = (x if cond_frames is None else torch.cat([x, cond_frames.to(x)], dim=1)).to(dtype)
        pred = current(x, timestep, text, clip, gather_output=False, shard=shard)[0]
        if config.guided:
            uncond = current(x, timestep, negative, clip, gather_output=False, shard=shard)[0]
            pred = uncond + scale * (pred - uncond)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    if first_frame is not None:
        latents = first_frame.apply(latents)
    return gather_frames(latents, shard)


def save_video(path, frames: np.ndarray, fps: int, crf: int = 17, preset: str = "faster") -> int:
    """Write RGB uint8 frames [F, H, W, 3] as an H.264 MP4 at `fps`; returns the frame count."""
    return encode_h264(path, frames, fps, crf, preset)


class WanSampler:
    """A model ready to sample, of the family whose pipeline folder `model_dir` is (models.spec_for_folder): the
    family's encoders of that folder and its model (under the initialized TP/CP groups) with the DiT weights of that
    folder, or of `transformer` (a diffusers transformer folder, or with layout='original' an original Wan-AI
    checkpoint folder). The DiT runs in `dtype`; umT5, the VAE and CLIP in
    `encoder_dtype` (float32 by default: diffusers' Wan examples keep the VAE in float32). Everything runs on
    `device`, by default this rank's CUDA device when there is one (parallel.default_device)."""

    def __init__(self, model_dir, *, transformer=None, layout: str = "diffusers", device=None,
                 dtype=torch.float32, encoder_dtype=torch.float32, offload: bool = False, task: str | None = None):
        self.spec = spec_for_folder(model_dir)
        if layout not in self.spec.adapter.LAYOUTS or (layout == "original" and transformer is None):
            raise ValueError(f"layout {layout!r}: expected 'diffusers', or 'original' with a transformer folder")
        device = parallel.default_device() if device is None else device
        self.encoders = self.spec.conditioner(model_dir, task, device, encoder_dtype, offload)
        # Wan 2.2 A14B: both experts (of model_dir, or of `transformer`'s folder) as one denoiser
        self.model = self.spec.load(transformer or model_dir, layout, params_dtype=dtype,
                                    **self.encoders.model_fields()).to(self.encoders.device)
        self.model.eval()
        if self.model.wan.model_type != self.encoders.task and not self.model.wan.expand_timesteps:  # TI2V: both
            raise ValueError(f"{transformer or model_dir}: a {self.model.wan.model_type} transformer, but the "
                             f"encoders of {model_dir} are {self.encoders.task}'s")
        self._negative = {}  # the negative prompt's text_emb, computed once

    @property
    def task(self) -> str:
        return self.encoders.task

    @property
    def needs_image(self) -> bool:
        """Whether `conditions` takes a reference image (the task conditions on one)."""
        return self.encoders.needs_image

    @property
    def geometry(self):
        """The latent geometry of this folder's VAE and this DiT's patch (LatentGeometry)."""
        return self.spec.geometry(self.model.wan, self.encoders.vae.config)

    def text(self, prompt: str) -> torch.Tensor:
        """umT5 states of `prompt` zero-padded to 512 tokens, as the pipelines feed them: [1, 512, text_dim]."""
        return pad_text(self.encoders.text([prompt])[0])[None].to(self.encoders.device)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F', H', W') of a `frames` x `height` x `width` video; a size the VAE or the patches cannot take is
        an error."""
        return self.geometry.latent_shape(frames, height, width)

    def conditions(self, prompt: str, frames: int, image=None) -> Conditions:
        """Conditions of one video: the prompt's text; a task that `needs_image` (I2V): the CLIP tokens and cond
        latent of the PIL reference `image`, which must have the video's size."""
        if not self.needs_image:
            return Conditions(self.text(prompt))
        if image is None:
            raise ValueError(f"{self.task} sampling needs a reference image")
        clip, cond = self.encoders.image_conditioning(image, frames)  # Wan 2.2: no CLIP tokens
        clip = None if clip is None else clip[None].to(self.encoders.device)
        return Conditions(self.text(prompt), clip, cond[None].to(self.encoders.device))

    def sample(self, cond: Conditions, shape, seeds, config: SamplingConfig) -> torch.Tensor:
        """Latents [len(seeds), *shape] under `cond`, one seed per sample (see `denoise`)."""
        frames = 1 if self.model.wan.expand_timesteps else shape[1]  # TI2V: the first frame's latent
        if cond.cond is not None and tuple(cond.cond.shape[2:]) != (frames, *shape[2:]):
            raise ValueError(f"I2V sampling: the reference image gives latent frames of {list(cond.cond.shape[2:])}, "
                             f"the video {list(shape[1:])}; the image must have the video's size")
        negative = None
        if config.guided:
            if config.negative_prompt not in self._negative:
                self._negative = {config.negative_prompt: self.text(config.negative_prompt)}
            negative = self._negative[config.negative_prompt]
        noise = initial_noise(seeds, shape).to(self.encoders.device)
        return denoise(self.model, noise, cond, negative, config)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalized latents [B, C, F', H', W'] -> RGB uint8 videos [B, F, H, W, 3] (the folder's VAE)."""
        return self.encoders.decode(latents)

