"""The world's VAE: diffusers' AutoencoderKLWan (Wan 2.1's class: causal 3D convolutions, 16 latent channels, 4x
in time) trained from scratch on whole world clips, with two spatial downsamplings (4x, `scale_factor_spatial=4`)
instead of Wan's three: a 32x32 clip becomes 8x8 latents, which the DiT patches 2x2 (80 tokens a clip).

Measured here: Wan's own 8x (base_dim 8, 2,000 steps on 9-frame windows, 20 minutes) reached 23 dB but blurred
triangles and squares into discs (shape read right on 36% of 64 test round trips) and drifted in the frames after
the ninth, which windows never showed it; hence 4x and whole clips. The loss is a mean-square error that weighs the
object's pixels (those off the background) 10x, because a small object is what a tiny VAE loses first, plus a
small KL term. Afterwards the latents' per-channel mean and std over the training clips are written into the config
(`latents_mean`, `latents_std`), so the DiT sees unit-scale latents.
"""

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from megatron_wan.eval.world_vocab import BACKGROUND

VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[True, True],
                  scale_factor_spatial=4)
OBJECT_WEIGHT = 10.0
KL_WEIGHT = 1e-6


def to_model(frames: np.ndarray) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] -> float [N, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, T, H, W] in [-1, 1] -> uint8 [N, T, H, W, 3]."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()


def object_weight(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight [N, 1, T, H, W]: OBJECT_WEIGHT where a pixel is off the background, else 1."""
    bg = torch.tensor(BACKGROUND, dtype=x.dtype).div(127.5).sub(1).view(1, 3, 1, 1, 1)
    off = (x - bg).abs().amax(dim=1, keepdim=True) > 0.1
    return 1 + (OBJECT_WEIGHT - 1) * off.to(x.dtype)


def round_trip(vae, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Encode (posterior mode) and decode `x` [N, 3, T, H, W] in batches, without gradients."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            z = vae.encode(x[i:i + batch]).latent_dist.mode()
            out.append(vae.decode(z).sample.clamp(-1, 1))
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1]."""
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(4 / max(mse, 1e-12))


def latent_stats(vae, x: torch.Tensor, batch: int = 32) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of `x`."""
    zs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            zs.append(vae.encode(x[i:i + batch]).latent_dist.mode())
    z = torch.cat(zs).transpose(0, 1).flatten(1)
    return z.mean(1).tolist(), z.std(1).tolist()


def train_vae(train: np.ndarray, held: np.ndarray, steps: int, batch: int = 8, lr: float = 1e-3, seed: int = 0,
              eval_every: int = 500):
    """Train an AutoencoderKLWan (VAE_CONFIG) on uint8 clips `train` [N, T, H, W, 3]; `held` clips measure it.
    Returns (vae with latents_mean / latents_std set, a summary)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(50, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    x_held = to_model(held)
    start, history = time.time(), []
    bar = tqdm(range(1, steps + 1), desc="world VAE", unit="step")
    for step in bar:
        x = to_model(train[rng.integers(0, len(train), batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (object_weight(x) * (rec - x) ** 2).mean() + KL_WEIGHT * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            vae.eval()
            value = psnr(round_trip(vae, x_held), x_held)
            vae.train()
            history.append({"step": step, "loss": loss.item(), "held_psnr": round(value, 2)})
            bar.set_postfix(loss=f"{loss.item():.4f}", held_psnr=f"{value:.1f} dB")
    vae.eval()
    mean, std = latent_stats(vae, to_model(train))
    vae.register_to_config(latents_mean=mean, latents_std=std)
    summary = {"steps": steps, "batch": batch, "config": VAE_CONFIG, "seconds": round(time.time() - start, 1),
               "held_psnr": history[-1]["held_psnr"], "history": history,
               "params": sum(p.numel() for p in vae.parameters())}
    return vae, summary
