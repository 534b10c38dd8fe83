"""Wan 2.1: the DiT on Megatron-Core (T2V and I2V, 1.3B and 14B), its state-dict adapter, conditioner and presets."""

from megatron_wan.models import ModelSpec, Task
from megatron_wan.models.wan21 import adapter
from megatron_wan.models.wan21.conditioner import WanEncoders, claims, latent_geometry
from megatron_wan.models.wan21.config import PRESETS, WanConfig, preset
from megatron_wan.models.wan21.model import WanModel
from megatron_wan.models.wan21.params import describe
from megatron_wan.models.wan21.tiny import write_tiny_wan

SPEC = ModelSpec(name="wan2.1", presets=PRESETS, config=preset, model=WanModel, adapter=adapter,
                 conditioner=WanEncoders, parameters=describe, write_tiny=write_tiny_wan,
                 tasks=(Task("t2v", image=False), Task("i2v", image=True)), latent_geometry=latent_geometry,
                 claims=claims)

__all__ = ["PRESETS", "SPEC", "WanConfig", "WanModel", "preset"]
