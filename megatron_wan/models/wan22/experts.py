"""A14B's two transformers as one denoiser: which expert (and which guidance scale) serves a timestep."""

from dataclasses import dataclass

from torch import nn

from megatron_wan.models.wan22.adapter import folder_info, load
from megatron_wan.models.wan22.config import HIGH_NOISE, LOW_NOISE, NUM_TRAIN_TIMESTEPS, expert_for_timestep


@dataclass
class ExpertPair:
    """The high-noise expert denoises t >= boundary_ratio x 1000, the low-noise one below (WanPipeline's rule)."""

    high_noise: nn.Module
    low_noise: nn.Module
    boundary_ratio: float

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * NUM_TRAIN_TIMESTEPS

    def expert(self, t) -> str:
        """The expert name of timestep `t` (a number or a 0-d tensor on the 0..1000 scale)."""
        return expert_for_timestep(float(t), self.boundary_ratio)

    def model(self, t) -> nn.Module:
        return {HIGH_NOISE: self.high_noise, LOW_NOISE: self.low_noise}[self.expert(t)]

    @property
    def wan(self):
        """The experts' config (both have the same architecture)."""
        return self.high_noise.wan

    def to(self, *args, **kwargs) -> "ExpertPair":
        self.high_noise.to(*args, **kwargs)
        self.low_noise.to(*args, **kwargs)
        return self

    def eval(self) -> "ExpertPair":
        self.high_noise.eval()
        self.low_noise.eval()
        return self


def load_denoiser(model_cls, folder, layout: str | None = None, **overrides):
    """The transformer of a Wan 2.2 folder: an ExpertPair for A14B (both experts), else the one model."""
    info = folder_info(folder)
    if not info.experts:
        return load(model_cls, folder, layout, overrides)
    high, low = (load(model_cls, folder, layout, overrides, expert=e) for e in (HIGH_NOISE, LOW_NOISE))
    return ExpertPair(high, low, info.boundary_ratio)
