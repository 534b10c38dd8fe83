"""Wan 2.2: T2V-A14B and I2V-A14B (two experts split at a timestep boundary) and TI2V-5B (per-token timesteps).

The transformers are Wan 2.1's architecture (same WanModel, WanConfig and adapter); this package adds the presets,
the experts and their boundary, the expert folders and the tiny random folders.
"""

from megatron_wan.models import ModelSpec
from megatron_wan.models.wan21.config import WanConfig
from megatron_wan.models.wan21.model import WanModel
from megatron_wan.models.wan22 import adapter
from megatron_wan.models.wan22.conditioner import Wan22Encoders
from megatron_wan.models.wan22.config import (
                                              BOUNDARY_RATIOS,
                                              DIFFUSERS_FOLDERS,
                                              EXPERTS,
                                              HIGH_NOISE,
                                              LOW_NOISE,
                                              ORIGINAL_FOLDERS,
                                              PRESETS,
                                              boundary_ratio,
                                              expert_for_timestep,
                                              experts,
                                              preset,
)
from megatron_wan.models.wan22.tiny import write_tiny

SPEC = ModelSpec(name="wan2.2", presets=PRESETS, config=preset, model=WanModel, adapter=adapter,
                 conditioner=Wan22Encoders, parameters=adapter.param_table, write_tiny=write_tiny)

__all__ = ["BOUNDARY_RATIOS", "DIFFUSERS_FOLDERS", "EXPERTS", "HIGH_NOISE", "LOW_NOISE", "ORIGINAL_FOLDERS",
           "PRESETS", "SPEC", "WanConfig", "WanModel", "boundary_ratio", "expert_for_timestep", "experts", "preset"]
