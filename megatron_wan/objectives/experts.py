"""Training Wan 2.2 A14B's two experts (config `model.expert`): which timesteps each learns, and `both` routed by t.

The released pipelines switch experts at boundary = boundary_ratio x 1000 of the scheduler's timesteps (the model's
timestep, sigma x 1000; diffusers' `WanPipeline`): `transformer`, the high-noise expert, for t >= boundary,
`transformer_2`, the low-noise one, below (boundary_ratio 0.875 T2V-A14B, 0.9 I2V-A14B).

- `high_noise` / `low_noise`: one expert trains, its t drawn from the run's timestep distribution restricted to its
  side of the boundary (inverse CDF on the truncated range: the same shape as the full draw, conditioned on the side).
- `both`: both experts train. Each step draws its side once, with the probability the full distribution gives that
  side, then every pair of the step draws t on it: each pair is routed by its own t (winner and loser share t, so
  they always hit the same expert), t keeps the full distribution over steps, and every rank runs the same expert
  in a step (FSDP2's collectives of the other expert never start). `Experts` holds the two and routes any batch by
  its timesteps; the reference is the routed pair with adapters off (or its copy).

Draws stay a pure function of (seed, step, sample id): a resumed run draws what an uninterrupted one does.
"""

import dataclasses
from pathlib import Path

import torch
from torch import nn

from megatron_wan.objectives.flow_matching import FlowMatching, _seed, shift_sigma

EXPERT_CHOICES = ("high_noise", "low_noise", "both")
STEP_STREAM = -1  # the sample id of a step's own draw (the side under `both`); sample ids are >= 0


def is_high_noise(timestep: torch.Tensor, boundary_ratio: float) -> torch.Tensor:
    """Which model timesteps [B] the high-noise expert takes (Wan 2.2's rule, `expert_for_timestep`)."""
    from megatron_wan.models.wan22 import HIGH_NOISE, expert_for_timestep

    return torch.tensor([expert_for_timestep(float(t), boundary_ratio) == HIGH_NOISE for t in timestep.reshape(-1)],
                        dtype=torch.bool, device=timestep.device).reshape(timestep.shape)


def _unshift(sigma: float, shift: float) -> float:
    """The t whose shifted sigma is `sigma` (the inverse of shift_sigma)."""
    return sigma / (shift - (shift - 1) * sigma)


@dataclasses.dataclass(frozen=True)
class ExpertFlow(FlowMatching):
    """FlowMatching whose draws fall on the side of the boundary that `expert` trains (see the module)."""

    expert: str = "both"
    boundary_ratio: float = 0.875

    def __post_init__(self):
        super().__post_init__()
        if self.expert not in EXPERT_CHOICES:
            raise ValueError(f"expert: expected one of {EXPERT_CHOICES}, found {self.expert!r}")
        if not 0 < self.boundary_ratio < 1:
            raise ValueError(f"boundary_ratio: expected a number in (0, 1), found {self.boundary_ratio}")

    def _cdf(self, t: float) -> float:
        """P(T <= t) of the run's (unshifted) timestep distribution."""
        if self.timestep_sampling == "uniform":
            return t
        z = (torch.logit(torch.tensor(t, dtype=torch.float64)) - self.logit_mean) / self.logit_std
        return torch.special.ndtr(z).item()

    def _icdf(self, p: torch.Tensor) -> torch.Tensor:
        if self.timestep_sampling == "uniform":
            return p
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(p))

    def high_noise_share(self) -> float:
        """The probability that a full draw lands on the high-noise side."""
        return 1.0 - self._cdf(_unshift(self.boundary_ratio, self.shift))

    def step_expert(self, step: int) -> str:
        """The expert this step trains: the configured one, or under `both` a side drawn from (seed, step)."""
        if self.expert != "both":
            return self.expert
        g = torch.Generator().manual_seed(_seed(self.seed, step, STEP_STREAM))
        return "high_noise" if torch.rand((), generator=g).item() < self.high_noise_share() else "low_noise"

    def _on_side(self, sigma: torch.Tensor, high: bool) -> torch.Tensor:
        """`sigma`, moved by float rounding steps (never more) until the model's timestep is on the side."""
        toward = torch.tensor(1.0 if high else 0.0)
        while bool(is_high_noise(self.model_timestep(sigma), self.boundary_ratio)) != high:
            sigma = torch.nextafter(sigma, toward)
        return sigma

    def draw(self, step: int, sample_ids, latent_shape) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [N], eps [N, *latent_shape]) as FlowMatching.draw, t restricted to this step's expert's side."""
        high = self.step_expert(step) == "high_noise"
        edge = self._cdf(_unshift(self.boundary_ratio, self.shift))
        low_p, high_p = (edge, 1.0) if high else (0.0, edge)
        sigmas, noises = [], []
        for sid in sample_ids:
            g = torch.Generator().manual_seed(_seed(self.seed, step, int(sid)))
            p = low_p + (high_p - low_p) * torch.rand((), generator=g, dtype=torch.float64)
            t = self._icdf(p.clamp(1e-12, 1 - 1e-12)).float()
            sigmas.append(self._on_side(shift_sigma(t, self.shift), high))
            noises.append(torch.randn(tuple(latent_shape), generator=g))
        return torch.stack(sigmas), torch.stack(noises)


class Experts(nn.Module):
    """The high-noise and low-noise experts as one model: `forward(x, timestep, ...)` runs each sample on the expert
    its timestep [B] belongs to (a batch on one side calls that expert alone) and returns what the expert returns."""

    def __init__(self, high_noise: nn.Module, low_noise: nn.Module, boundary_ratio: float):
        super().__init__()
        self.high_noise, self.low_noise, self.boundary_ratio = high_noise, low_noise, boundary_ratio

    @property
    def wan(self):
        """The experts' shared architecture (both are the same config)."""
        return self.high_noise.wan

    @property
    def blocks(self) -> list:
        """Both experts' blocks, the units FSDP2 shards one by one (megatron_wan.parallel.parallelize)."""
        return [*self.high_noise.blocks, *self.low_noise.blocks]

    @property
    def experts(self) -> tuple:
        return self.high_noise, self.low_noise

    def forward(self, x, timestep, *args, **kwargs):
        high = is_high_noise(timestep, self.boundary_ratio)
        if high.all() or not high.any():
            return (self.high_noise if high.all() else self.low_noise)(x, timestep, *args, **kwargs)
        n = x.shape[0]
        rows = {True: high.nonzero()[:, 0], False: (~high).nonzero()[:, 0]}

        def pick(value, index):
            return value[index] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n else value

        outputs = {}
        for side, expert in ((True, self.high_noise), (False, self.low_noise)):
            i = rows[side]
            outputs[side] = expert(x[i], timestep[i], *(pick(a, i) for a in args),
                                   **{k: pick(v, i) for k, v in kwargs.items()})

        def stitch(a, b):
            if not isinstance(a, torch.Tensor):
                return a  # e.g. the frame shard: the same for every sample
            out = a.new_empty((n, *a.shape[1:]))
            out[rows[True]], out[rows[False]] = a, b
            return out

        high_out, low_out = outputs[True], outputs[False]
        if isinstance(high_out, tuple):
            return tuple(stitch(a, b) for a, b in zip(high_out, low_out))
        return stitch(high_out, low_out)


def boundary_ratio(model_cfg) -> float | None:
    """The experts' boundary of the `model` config: model.boundary_ratio, else the Wan 2.2 folder's (diffusers:
    model_index.json; original A14B: the released one), else (no such folder) the preset's; None when none."""
    from megatron_wan.models import wan22

    if model_cfg.boundary_ratio is not None:
        return model_cfg.boundary_ratio
    if model_cfg.weights and Path(model_cfg.weights).is_dir():
        try:
            return wan22.adapter.folder_info(model_cfg.weights).boundary_ratio
        except (FileNotFoundError, ValueError):
            return None
    return wan22.BOUNDARY_RATIOS.get(model_cfg.preset)  # also for a recipe checked before its folder exists


def expert_problem(cfg) -> str | None:
    """What makes `model.expert` impossible in `cfg` (a message naming the key), or None."""
    m = cfg.model
    if m.expert is None:
        return None
    if m.expert not in EXPERT_CHOICES:
        return f"model.expert: expected one of {list(EXPERT_CHOICES)} (or null), found {m.expert!r}"
    if m.boundary_ratio is not None and not 0 < m.boundary_ratio < 1:
        return f"model.boundary_ratio: expected a number in (0, 1), found {m.boundary_ratio}"
    if boundary_ratio(m) is None:
        where = m.weights or f"preset {m.preset}"
        return (f"model.expert: {m.expert} needs two experts and their boundary; {where} has none (a Wan 2.2 "
                f"A14B folder or preset has)")
    if cfg.run.sample_every:
        return ("run.sample_every: samples during training are not wired to A14B's experts yet (model.expert); use "
                "run.validate_every, and sample the exported experts with eval sample")
    if m.expert == "both" and cfg.objective.reference == "copy_offload" and cfg.objective.mode != "sft":
        return "objective.reference: copy_offload streams one model; with model.expert=both use adapter or copy"
    return None


def build_expert_model(cfg) -> nn.Module:
    """The policy of `model.expert`: one expert of the Wan 2.2 folder model.weights (diffusers or original layout)
    or of the preset (random init: the high-noise expert seeded with model.init_seed, the low-noise one with
    init_seed + 1), or `Experts` of both."""
    from megatron_wan.config import ConfigError
    from megatron_wan.models import wan22

    m = cfg.model
    runtime = dict(attention_backend=m.attention_backend, layer_provider=m.layer_provider, cp_comm=m.cp_comm,
                   recompute=m.recompute)

    def one(expert):
        if m.weights:
            model = wan22.adapter.load(wan22.WanModel, m.weights, m.layout, runtime, expert=expert)
        else:
            torch.manual_seed(m.init_seed + (expert == wan22.LOW_NOISE))  # every rank builds the same weights
            model = wan22.WanModel(wan22.preset(m.preset, **runtime))
        if model.wan.model_type != cfg.run.task:
            raise ConfigError(f"run.task: {cfg.run.task} but the {expert} expert of {m.weights or m.preset} is "
                              f"{model.wan.model_type}")
        return model

    if m.expert != "both":
        return one(m.expert)
    return Experts(one(wan22.HIGH_NOISE), one(wan22.LOW_NOISE), boundary_ratio(m))


def flow_for(cfg, flow: FlowMatching) -> FlowMatching:
    """`flow`, restricted to `model.expert`'s timesteps when it is set."""
    if cfg.model.expert is None:
        return flow
    fields = {f.name: getattr(flow, f.name) for f in dataclasses.fields(FlowMatching)}
    return ExpertFlow(**fields, expert=cfg.model.expert, boundary_ratio=boundary_ratio(cfg.model))
