"""The Wan DiT on Megatron-Core (public import path; the family packages live in `megatron_wan.models`)."""

from megatron_wan.models.wan21 import PRESETS, WanConfig, WanModel, preset

__all__ = ["PRESETS", "WanConfig", "WanModel", "preset"]
