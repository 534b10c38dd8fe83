"""Model families, one package each, looked up by name (`get_model_spec("wan2.1")`), by preset
(`spec_for_preset`) or by a pipeline folder (`spec_for_folder`).

A family package exposes `SPEC`, a `ModelSpec`: its presets and tasks, the model builder, the state-dict adapter,
the conditioner (encoders and latent geometry, read from the VAE's config), the parameter description and the tiny
random checkpoint writer. Callers (trainer, data_tools, sampler, export, eval, planner) look the family up instead
of branching on it. A family's config has `model_type` (one of its task names) and `patch_size` (t, h, w).
"""

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# family name -> package (adding a family: one line here)
FAMILIES = {"wan2.1": "megatron_wan.models.wan21", "wan2.2": "megatron_wan.models.wan22"}


@dataclass(frozen=True)
class Task:
    """A task a family's models are made for, by what they condition on."""

    name: str  # "t2v", "i2v", ...: the config's model_type, run.task, the encodings' task
    image: bool  # conditioned on a reference image (the first frame) besides the prompt


@dataclass(frozen=True)
class ModelSpec:
    """One model family, as the rest of the stack sees it."""

    name: str
    presets: Mapping[str, dict]  # preset name -> config fields
    config: Callable[..., Any]  # (preset name, **overrides) -> config
    model: type  # config -> model (nn.Module); needs the process groups set up (megatron_wan.parallel.initialize)
    adapter: ModuleType  # state-dict adapter: diffusers / original layouts <-> ours, TP split / merge, load
    conditioner: type  # (model_dir, task, device, dtype, offload, components) -> the frozen encoders of a folder
    parameters: Callable[..., Any]  # config -> its models.parameters.Description (parameter table, counts, FLOPs)
    write_tiny: Callable[..., Any]  # (directory, task, seed) -> a tiny random checkpoint folder
    tasks: tuple[Task, ...] = ()
    latent_geometry: Callable[..., Any] | None = None  # (vae config | folder | None, DiT config) -> LatentGeometry
    claims: Callable[[Path], bool] | None = None  # whether a diffusers pipeline folder holds this family's model
    loader: Callable[..., Any] | None = None  # (model class, source, layout, **overrides) -> the denoiser (a model,
    # or e.g. Wan 2.2 A14B's expert pair); None: the adapter's load

    def task(self, name: str) -> Task:
        """The task `name`; one this family does not have is an error listing its tasks."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"model family {self.name} has no task {name!r}; its tasks: "
                       f"{', '.join(t.name for t in self.tasks)}")

    def build(self, preset: str, **overrides):
        """A randomly initialized model of `preset` (with config field overrides)."""
        return self.model(self.config(preset, **overrides))

    def load(self, source, layout: str = "diffusers", **overrides):
        """The model of a checkpoint (folder, state dict or module) in `layout` ("diffusers" or "original"), each
        TP rank loading only its slice; `overrides` are config fields (runtime choices, dtype)."""
        if self.loader is not None:
            return self.loader(self.model, source, layout, **overrides)
        return self.adapter.load(self.model, source, layout, overrides)

    def geometry(self, config=None, vae_config=None):
        """The latent geometry of this family's VAE (`vae_config`: a config, a folder, or None for the family's
        own) for the DiT `config` (None: the family's default patch)."""
        return self.latent_geometry(vae_config, config)


def get_model_spec(name: str) -> ModelSpec:
    """The family `name` (e.g. "wan2.1"); an unknown name lists the known ones."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).SPEC


def all_specs() -> list[ModelSpec]:
    """Every registered family, in FAMILIES' order."""
    return [get_model_spec(name) for name in FAMILIES]


def spec_for_preset(preset: str) -> ModelSpec:
    """The family that defines the preset `preset`; an unknown preset lists every family's presets."""
    specs = all_specs()
    for spec in specs:
        if preset in spec.presets:
            return spec
    known = ", ".join(p for spec in specs for p in spec.presets)
    raise KeyError(f"unknown preset {preset!r}; known presets: {known}")


def spec_for_folder(folder) -> ModelSpec:
    """The family whose model a diffusers pipeline folder holds (each family's `claims` is asked); none or more
    than one is an error naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder (expected a diffusers pipeline folder)")
    specs = all_specs()
    found = [spec for spec in specs if spec.claims is not None and spec.claims(folder)]
    if len(found) != 1:
        which = "no family" if not found else f"several families ({', '.join(s.name for s in found)})"
        raise ValueError(f"{folder}: {which} recognizes this folder as its model; known families: "
                         f"{', '.join(s.name for s in specs)}")
    return found[0]


def task(name: str) -> Task:
    """The task `name` of whichever family has it; an unknown one lists every family's tasks."""
    for spec in all_specs():
        for t in spec.tasks:
            if t.name == name:
                return t
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")


def task_names() -> tuple[str, ...]:
    """Every family's task names, each once, in FAMILIES' order."""
    return tuple(dict.fromkeys(t.name for spec in all_specs() for t in spec.tasks))
