"""The Wan 2.1 DiT on Megatron-Core."""

from megatron_wan.model.wan_config import PRESETS, WanConfig, preset
from megatron_wan.model.wan_model import WanModel

__all__ = ["PRESETS", "WanConfig", "WanModel", "preset"]
