"""Wan 2.2 presets: the A14B pairs of experts (T2V, I2V) and TI2V-5B, with their expert boundary.

A14B is two Wan-2.1-architecture 14B transformers: the high-noise expert (diffusers' `transformer`, Wan-AI's
`high_noise_model/`) denoises timesteps t >= boundary_ratio x 1000, the low-noise one (`transformer_2`,
`low_noise_model/`) those below. I2V-A14B conditions by channels only (36 = noise + 4-channel mask + first-frame
latent), without CLIP image tokens. TI2V-5B is one transformer on the Wan 2.2 VAE's 48-channel latents whose
timestep is per token (`expand_timesteps`); image-to-video puts the image's latent in the first frame at t = 0.
"""

from megatron_wan.models.wan21.config import WanConfig

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"
EXPERTS = (HIGH_NOISE, LOW_NOISE)  # in denoising order
DIFFUSERS_FOLDERS = {HIGH_NOISE: "transformer", LOW_NOISE: "transformer_2"}  # expert -> diffusers component
ORIGINAL_FOLDERS = {HIGH_NOISE: "high_noise_model", LOW_NOISE: "low_noise_model"}  # expert -> Wan-AI subfolder
NUM_TRAIN_TIMESTEPS = 1000

_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_TINY = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32)  # head_dim 16 as wan2.1's tiny

PRESETS: dict[str, dict] = {
    "wan2.2-t2v-a14b": dict(_A14B),
    "wan2.2-i2v-a14b": dict(_A14B, model_type="i2v", in_dim=36),
    "wan2.2-ti2v-5b": dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48,
                           expand_timesteps=True),
    # tiny random configs for tests and the CPU demo
    "tiny-wan2.2-t2v-a14b": dict(_TINY),
    "tiny-wan2.2-i2v-a14b": dict(_TINY, model_type="i2v", in_dim=36),
    "tiny-wan2.2-ti2v": dict(_TINY, in_dim=48, out_dim=48, expand_timesteps=True),
}
# preset -> boundary_ratio of the released pipelines (None: one transformer, no experts)
BOUNDARY_RATIOS: dict[str, float | None] = {
    "wan2.2-t2v-a14b": 0.875, "wan2.2-i2v-a14b": 0.9, "wan2.2-ti2v-5b": None,
    "tiny-wan2.2-t2v-a14b": 0.875, "tiny-wan2.2-i2v-a14b": 0.9, "tiny-wan2.2-ti2v": None,
}


def _known(name: str):
    if name not in PRESETS:
        raise KeyError(f"unknown Wan 2.2 preset {name!r}; known presets: {', '.join(PRESETS)}")


def preset(name: str, **overrides) -> WanConfig:
    """The named preset's config (one expert's: both A14B experts share it), with field overrides."""
    _known(name)
    return WanConfig().replace(**PRESETS[name]).replace(**overrides)


def boundary_ratio(name: str) -> float | None:
    """The preset's expert boundary as a fraction of the 1000 training timesteps; None for one transformer."""
    _known(name)
    return BOUNDARY_RATIOS[name]


def experts(name: str) -> tuple[str, ...]:
    """The preset's expert names in denoising order: ('high_noise', 'low_noise') for A14B, () for TI2V-5B."""
    return EXPERTS if boundary_ratio(name) is not None else ()


def expert_for_timestep(t: float, ratio: float) -> str:
    """The expert that denoises timestep `t` (0..1000): high_noise for t >= ratio x 1000 (as WanPipeline)."""
    return HIGH_NOISE if t >= ratio * NUM_TRAIN_TIMESTEPS else LOW_NOISE
