"""Wan's rectified flow: timestep sampling, the sigma shift, noising and the velocity target.

sigma = shift*t / (1 + (shift-1)*t),  x_t = (1-sigma)*x0 + sigma*eps,  target v = eps - x0,
and the model is fed timestep = sigma * 1000 (as Wan and diffusers' flow-matching schedulers do).

Draws are a pure function of (seed, step, sample id): the winner and the loser of a pair share the
sample id, hence the same t and the same eps, and a resumed run draws what an uninterrupted one would.
"""

from dataclasses import dataclass

import torch

from megatron_wan.parallel.context_parallel import FrameShard, whole_video_sum

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) for seed mixing


def _seed(seed: int, step: int, sample_id: int) -> int:
    h = 0
    for v in (seed, step, sample_id):
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = shift*t / (1 + (shift-1)*t)."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class FlowMatching:
    """Wan 2.1 flow matching. shift 5.0 is Wan's for 720p (3.0 for 480p)."""

    shift: float = 5.0
    timestep_sampling: str = "uniform"  # "uniform" or "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling: expected 'uniform' or 'logit_normal', "
                             f"found {self.timestep_sampling!r}")

    def draw(self, step: int, sample_ids, latent_shape) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [N], eps [N, *latent_shape]) in float32 on the CPU, one independent stream per sample id."""
        sigmas, noises = [], []
        for sid in sample_ids:
            g = torch.Generator().manual_seed(_seed(self.seed, step, int(sid)))
            if self.timestep_sampling == "uniform":
                t = torch.rand((), generator=g)
            else:
                t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn((), generator=g))
            sigmas.append(shift_sigma(t, self.shift))
            noises.append(torch.randn(tuple(latent_shape), generator=g))
        return torch.stack(sigmas), torch.stack(noises)

    def noised(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor):
        """(x_t, target v = eps - x0) for per-sample sigma [N]."""
        s = sigma.to(x0).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - s) * x0 + s * eps.to(x0), eps.to(x0) - x0

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.num_train_timesteps


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor, shard: FrameShard | None = None) -> torch.Tensor:
    """err [N] = mean over all latent elements of the whole video of (target - prediction)^2, in float32.

    Under context parallelism `prediction` is this rank's frames (`model(..., gather_output=False)`) and
    `target` the whole video. The DPO sigmoid needs the error of the WHOLE video, not of a shard: each
    rank sums the squares of its real frames, one all-reduce of N scalars over the CP group adds them,
    and the sum is divided by the element count of the whole video.
    """
    if shard is None or shard.size == 1:
        return (target.float() - prediction.float()).pow(2).flatten(1).mean(1)
    local = (shard.local_latents(target).float() - prediction.float()).pow(2)[:, :, : shard.valid_latent_frames]
    return whole_video_sum(local.flatten(1).sum(1), shard) / target[0].numel()
