"""Model families, one package each, looked up by name (`get_model_spec("wan2.1")`) or by preset.

A family package exposes `SPEC`, a `ModelSpec`: its presets, the model builder, the state-dict adapter, the
conditioner (encoders and latent geometry), the parameter description and the tiny random checkpoint writer.
Callers (trainer, data_tools, sampler, export, eval, planner) look the family up instead of branching on it.
"""

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# family name -> package (adding a family: one line here)
FAMILIES = {"wan2.1": "megatron_wan.models.wan21", "wan2.2": "megatron_wan.models.wan22"}


@dataclass(frozen=True)
class ModelSpec:
    """One model family, as the rest of the stack sees it."""

    name: str
    presets: Mapping[str, dict]  # preset name -> config fields
    config: Callable[..., Any]  # (preset name, **overrides) -> config
    model: type  # config -> model (nn.Module)
    adapter: ModuleType  # state-dict adapter: diffusers / original layouts <-> ours, TP split / merge, load
    conditioner: type  # frozen encoders of a checkpoint folder (text, VAE, image), latent geometry
    parameters: Callable[..., Any]  # config -> the one description of its parameters
    write_tiny: Callable[..., Any]  # (directory, task, seed) -> a tiny random checkpoint folder


def get_model_spec(name: str) -> ModelSpec:
    """The family `name` (e.g. "wan2.1"); an unknown name lists the known ones."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).SPEC


def spec_for_preset(preset: str) -> ModelSpec:
    """The family that defines the preset `preset`; an unknown preset lists every family's presets."""
    specs = [get_model_spec(name) for name in FAMILIES]
    for spec in specs:
        if preset in spec.presets:
            return spec
    known = ", ".join(p for spec in specs for p in spec.presets)
    raise KeyError(f"unknown preset {preset!r}; known presets: {known}")
