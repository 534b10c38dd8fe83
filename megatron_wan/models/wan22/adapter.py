"""Wan 2.2 weights: each expert is a Wan 2.1-architecture transformer, so wan2.1's adapter converts it."""

from megatron_wan.models.wan21.adapter import (
                                               LAYOUTS,
                                               Param,
                                               SafetensorsSource,
                                               StateDictSource,
                                               config_from_diffusers,
                                               config_to_diffusers,
                                               from_ours,
                                               load,
                                               merge_tp,
                                               param_table,
                                               rename,
                                               split_tp,
                                               to_ours,
)

__all__ = ["LAYOUTS", "Param", "SafetensorsSource", "StateDictSource", "config_from_diffusers", "config_to_diffusers",
           "from_ours", "load", "merge_tp", "param_table", "rename", "split_tp", "to_ours"]
