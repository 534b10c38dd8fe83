"""Wan 2.2 weights: each A14B expert, and TI2V-5B's one transformer, is a Wan 2.1-architecture transformer, which
wan2.1's adapter converts (same tables, renames and TP slices); this module adds where the experts live in a folder
and the Wan 2.2 configs.

- diffusers layout: `model_index.json` with `boundary_ratio` and `expand_timesteps`; `transformer/` (the high-noise
  expert, or TI2V-5B's transformer) and `transformer_2/` (the low-noise expert).
- original Wan-AI layout: `high_noise_model/` and `low_noise_model/` (A14B), each a config.json (model_type t2v or
  i2v; Wan 2.2 has no CLIP image tokens) and sharded safetensors; TI2V-5B's transformer at the top of its folder
  (model_type ti2v).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_wan.models.wan21.adapter import (
    LAYOUTS,
    Param,
    SafetensorsSource,
    StateDictSource,
    config_from_diffusers,
    config_to_diffusers,
    from_ours,
    load_from,
    merge_tp,
    param_table,
    rename,
    split_tp,
    to_ours,
)
from megatron_wan.models.wan21.adapter import config_to_original as wan21_config_to_original
from megatron_wan.models.wan21.adapter import open_source as wan21_open_source
from megatron_wan.models.wan21.config import WanConfig
from megatron_wan.models.wan22.config import BOUNDARY_RATIOS, DIFFUSERS_FOLDERS, EXPERTS, ORIGINAL_FOLDERS

__all__ = ["LAYOUTS", "Param", "SafetensorsSource", "StateDictSource", "config_from_diffusers", "config_to_diffusers",
           "FolderInfo", "config_from_original", "config_to_original", "expert_folder", "folder_info", "from_ours",
           "is_wan22_folder",
           "load", "open_source", "merge_tp", "param_table", "rename", "split_tp", "to_ours"]

# released boundary of an original A14B folder (its config.json does not hold it), by model_type
ORIGINAL_BOUNDARY = {"t2v": BOUNDARY_RATIOS["wan2.2-t2v-a14b"], "i2v": BOUNDARY_RATIOS["wan2.2-i2v-a14b"]}


@dataclass(frozen=True)
class FolderInfo:
    """What a Wan 2.2 checkpoint folder holds."""

    layout: str  # "diffusers" or "original"
    experts: tuple[str, ...]  # ("high_noise", "low_noise"), or () for one transformer
    boundary_ratio: float | None
    expand_timesteps: bool  # per-token timesteps (TI2V-5B)


def config_from_original(c) -> WanConfig:
    """WanConfig from an original Wan 2.2 config.json (model_type t2v, i2v or ti2v; no CLIP image tokens)."""
    model_type = c.get("model_type", "t2v")
    if model_type not in ("t2v", "i2v", "ti2v"):
        raise ValueError(f"original Wan 2.2 config model_type: expected 't2v', 'i2v' or 'ti2v', found {model_type!r}")
    return WanConfig(
        model_type="i2v" if model_type == "i2v" else "t2v", expand_timesteps=model_type == "ti2v", dim=c["dim"],
        ffn_dim=c["ffn_dim"], freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096),
        num_heads=c["num_heads"], num_layers=c["num_layers"], in_dim=c["in_dim"], out_dim=c["out_dim"],
        patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c.get("eps", 1e-6), qk_norm=c.get("qk_norm", True),
        cross_attn_norm=c.get("cross_attn_norm", True),
    )


def config_to_original(cfg: WanConfig) -> dict:
    """The original Wan 2.2 config.json of `cfg` (model_type ti2v for per-token timesteps)."""
    if cfg.has_image_tokens:
        raise ValueError("a Wan 2.2 transformer has no CLIP image tokens; found image_dim="
                         f"{cfg.image_dim} (a Wan 2.1 I2V config?)")
    return {**wan21_config_to_original(cfg), "model_type": "ti2v" if cfg.expand_timesteps else cfg.model_type}


def _index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def folder_info(folder) -> FolderInfo:
    """Layout, experts, boundary and per-token timesteps of a Wan 2.2 folder; a folder of neither layout is an
    error naming what was looked for."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        index = _index(folder)
        two = index.get("transformer_2") not in (None, [None, None])
        ratio = index.get("boundary_ratio")
        if two and ratio is None:
            raise ValueError(f"{folder}/model_index.json: transformer_2 without a boundary_ratio")
        return FolderInfo("diffusers", EXPERTS if two else (), ratio if two else None,
                          bool(index.get("expand_timesteps")))
    if all((folder / ORIGINAL_FOLDERS[e] / "config.json").is_file() for e in EXPERTS):
        model_type = json.loads((folder / ORIGINAL_FOLDERS[EXPERTS[0]] / "config.json").read_text()).get("model_type")
        if model_type not in ORIGINAL_BOUNDARY:
            raise ValueError(f"{folder}/{ORIGINAL_FOLDERS[EXPERTS[0]]}/config.json: model_type {model_type!r}, "
                             f"expected one of {sorted(ORIGINAL_BOUNDARY)} for a pair of experts")
        return FolderInfo("original", EXPERTS, ORIGINAL_BOUNDARY[model_type], False)
    if (folder / "config.json").is_file():
        raw = json.loads((folder / "config.json").read_text())
        if raw.get("_class_name") == "WanTransformer3DModel":  # one diffusers transformer (per-token: its pipeline's)
            return FolderInfo("diffusers", (), None, False)
        return FolderInfo("original", (), None, config_from_original(raw).expand_timesteps)
    raise FileNotFoundError(f"{folder}: not a Wan 2.2 folder (no model_index.json, no {ORIGINAL_FOLDERS[EXPERTS[0]]}/"
                            f" and {ORIGINAL_FOLDERS[EXPERTS[1]]}/, no config.json)")


def is_wan22_folder(folder) -> bool:
    """Whether a diffusers pipeline folder holds a Wan 2.2 model: a pair of experts (transformer_2) or
    per-token timesteps (expand_timesteps) in its model_index.json."""
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        return False
    index = _index(Path(folder))
    return index.get("transformer_2") not in (None, [None, None]) or bool(index.get("expand_timesteps"))


def expert_folder(folder, expert: str | None = None) -> Path:
    """The transformer folder of `expert` ('high_noise' / 'low_noise'; None for a folder of one transformer)."""
    folder = Path(folder)
    info = folder_info(folder)
    if expert is None and info.experts:
        raise ValueError(f"{folder}: holds two experts {list(info.experts)}; pass expert= one of them")
    if expert is not None and expert not in info.experts:
        has = f"its experts are {list(info.experts)}" if info.experts else "it holds one transformer (expert=None)"
        raise ValueError(f"{folder}: no expert {expert!r}; {has}")
    if info.layout == "diffusers" and (folder / "model_index.json").is_file():
        return folder / DIFFUSERS_FOLDERS[expert or EXPERTS[0]]
    return folder / ORIGINAL_FOLDERS[expert] if expert else folder


def _checkpoint_folder(source, layout: str | None) -> bool:
    """Whether `source` is a folder `folder_info` reads: a pipeline folder, the experts' parent or an original
    transformer folder (a diffusers transformer folder goes to wan2.1's loader)."""
    if not isinstance(source, (str, Path)):
        return False
    folder = Path(source)
    return ((folder / "model_index.json").is_file() or (folder / ORIGINAL_FOLDERS[EXPERTS[0]]).is_dir()
            or (layout in (None, "original") and (folder / "config.json").is_file()))


def _open_folder(folder: Path, expert: str | None, layout: str | None):
    info = folder_info(folder)
    if layout not in (None, info.layout):
        raise ValueError(f"{folder}: a Wan 2.2 folder in the {info.layout} layout, asked to load it as {layout}")
    sub = expert_folder(folder, expert)
    config_file = sub / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{sub}: no config.json (expected a {info.layout} Wan transformer folder)")
    raw = json.loads(config_file.read_text())
    if info.layout == "diffusers":
        cfg = config_from_diffusers(raw).replace(expand_timesteps=info.expand_timesteps)
    else:
        cfg = config_from_original(raw)
    return SafetensorsSource(sub), cfg, info.layout


def _open(source, layout: str | None, overrides: dict):
    """(source, config, layout, overrides without `expert`) of one transformer of a Wan 2.2 checkpoint."""
    overrides = dict(overrides or {})
    expert = overrides.pop("expert", None)
    if _checkpoint_folder(source, layout):
        return (*_open_folder(Path(source), expert, layout), overrides)
    if expert is not None:
        raise ValueError(f"expert={expert!r} names a transformer of a pipeline folder; {source!r} is not one")
    return (*wan21_open_source(source, layout or "diffusers", overrides), layout or "diffusers", overrides)


def open_source(source, layout: str | None, overrides: dict):
    """(weights source, WanConfig) of one transformer of a Wan 2.2 checkpoint, as wan2.1's `open_source`: a
    pipeline folder in either layout (`overrides["expert"]` naming the A14B expert), else a transformer folder,
    module or state dict in `layout`."""
    src, cfg, _, _ = _open(source, layout, overrides)
    return src, cfg


def load(model_cls, source, layout: str | None = "diffusers", overrides: dict | None = None,
         expert: str | None = None):
    """Build `model_cls` for one transformer of a Wan 2.2 checkpoint, each TP rank reading only its slice.

    `source` is a folder (a pipeline folder in either layout, `expert` naming the A14B expert; `layout=None` reads
    the layout from the folder) or, as for Wan 2.1, a transformer folder, module or state dict in `layout`.
    `overrides` are config fields; an `expert` among them (as `ModelSpec.load(folder, expert=...)` passes it) is
    taken out."""
    overrides = dict(overrides or {})
    overrides.setdefault("expert", expert)
    src, cfg, layout, overrides = _open(source, layout, overrides)
    return load_from(model_cls, src, cfg, layout, overrides)
