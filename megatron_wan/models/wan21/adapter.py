"""Weights between our layout, diffusers' WanTransformer3DModel and the original Wan-AI checkpoints.

One table (`param_table`, from the family's parameter description in params.py) lists every parameter of a config
with its full shape and its TP split dimension; the renames below give its name in each layout. Conversions are
lookups in that table, so a round trip is bit-exact. TP ranks read only their slice of the split tensors.
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from megatron_wan import parallel
from megatron_wan.models.parameters import Param
from megatron_wan.models.wan21.config import WanConfig
from megatron_wan.models.wan21.params import describe

LAYOUTS = ("diffusers", "original")

# module names outside the blocks: ours -> (diffusers, original)
_TOP = {
    "patch_embedding": ("patch_embedding", "patch_embedding"),
    "time.time_embedding.linear_1": ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    "time.time_embedding.linear_2": ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    "time.time_projection": ("condition_embedder.time_proj", "time_projection.1"),
    "text_embedding.linear_1": ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    "text_embedding.linear_2": ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    "image_embedding.norm1": ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    "image_embedding.mlp.linear_1": ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    "image_embedding.mlp.linear_2": ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    "image_embedding.norm2": ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    "head.linear": ("proj_out", "head.head"),
    "head.modulation": ("scale_shift_table", "head.modulation"),
}
# module names inside block N: ours -> (diffusers, original)
_BLOCK = {
    "modulation": ("scale_shift_table", "modulation"),
    "cross_norm": ("norm2", "norm3"),
    "mlp.linear_fc1": ("ffn.net.0.proj", "ffn.0"),
    "mlp.linear_fc2": ("ffn.net.2", "ffn.2"),
    "cross_attention.linear_k_img": ("attn2.add_k_proj", "cross_attn.k_img"),
    "cross_attention.linear_v_img": ("attn2.add_v_proj", "cross_attn.v_img"),
    "cross_attention.k_img_norm": ("attn2.norm_added_k", "cross_attn.norm_k_img"),
}
for _ours, _diff, _orig in (("self_attention", "attn1", "self_attn"), ("cross_attention", "attn2", "cross_attn")):
    for _o, _d, _g in (("linear_q", "to_q", "q"), ("linear_k", "to_k", "k"), ("linear_v", "to_v", "v"),
                       ("linear_proj", "to_out.0", "o"), ("q_norm", "norm_q", "norm_q"),
                       ("k_norm", "norm_k", "norm_k")):
        _BLOCK[f"{_ours}.{_o}"] = (f"{_diff}.{_d}", f"{_orig}.{_g}")

# keys present in published checkpoints that no layer reads
_IGNORED = ("norm_added_q",)


def rename(key: str, layout: str) -> str:
    """Our parameter name -> its name in `layout` ('diffusers' or 'original')."""
    column = LAYOUTS.index(layout)
    parts = key.split(".")
    if parts[0] == "blocks":
        prefix, table, rest = f"blocks.{parts[1]}.", _BLOCK, parts[2:]
    else:
        prefix, table, rest = "", _TOP, parts
    for cut in range(len(rest), 0, -1):
        module = ".".join(rest[:cut])
        if module in table:
            return prefix + ".".join([table[module][column], *rest[cut:]])
    raise KeyError(f"no {layout} name for parameter {key!r}")


def param_table(cfg: WanConfig) -> list[Param]:
    """Every parameter of `cfg` (full, unsplit shapes) in our naming: the family's description (params.py)."""
    return list(describe(cfg).params)


def _slice(shape, split, rank, size) -> tuple:
    if split is None or size == 1:
        return tuple(slice(None) for _ in shape)
    if shape[split] % size:
        raise ValueError(f"dimension {split} of size {shape[split]} is not divisible by tensor_parallel={size}")
    n = shape[split] // size
    return tuple(slice(rank * n, (rank + 1) * n) if i == split else slice(None) for i in range(len(shape)))


class StateDictSource:
    """An in-memory state dict (a 'model.diffusion_model.' prefix is dropped)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], where: str = "state dict"):
        self.tensors = {k.removeprefix("model.diffusion_model."): v for k, v in state_dict.items()}
        self.where = where

    def keys(self):
        return self.tensors.keys()

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def read(self, key, index):
        return self.tensors[key][index]


class SafetensorsSource:
    """A folder of (sharded) safetensors files, read lazily: only the requested slice leaves the disk."""

    def __init__(self, folder: Path):
        self.where = str(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors weight files")
        self.handles, self.file_of = {}, {}
        for f in files:
            h = safe_open(str(f), framework="pt")
            self.handles[f.name] = h
            for k in h.keys():
                self.file_of[k.removeprefix("model.diffusion_model.")] = (f.name, k)

    def keys(self):
        return self.file_of.keys()

    def _slice(self, key):
        file, raw = self.file_of[key]
        return self.handles[file].get_slice(raw)

    def shape(self, key):
        return tuple(self._slice(key).get_shape())

    def read(self, key, index):
        return self._slice(key)[index]


def to_ours(source, cfg: WanConfig, layout: str, tp_rank: int = 0, tp_size: int = 1) -> dict:
    """Our state dict for one TP rank, from a source in `layout`. Missing keys are all listed; a wrong
    shape names the key, the expected and the found shape; keys no layer reads are refused by name."""
    if not isinstance(source, (StateDictSource, SafetensorsSource)):
        source = StateDictSource(source)
    table = param_table(cfg)
    names = {p.name: rename(p.name, layout) for p in table}
    present = set(source.keys())
    missing = [n for n in names.values() if n not in present]
    if missing:
        raise KeyError(f"{source.where}: {len(missing)} {layout} key(s) missing: {missing}")
    unexpected = sorted(k for k in present - set(names.values()) if not any(i in k for i in _IGNORED))
    if unexpected:
        raise KeyError(f"{source.where}: {len(unexpected)} key(s) that no {layout} Wan layer of this config reads: "
                       f"{unexpected}")
    out = {}
    for p in table:
        key = names[p.name]
        found = source.shape(key)
        if found != p.shape:
            raise ValueError(f"{source.where}: {key}: expected shape {list(p.shape)}, found {list(found)}")
        out[p.name] = source.read(key, _slice(p.shape, p.split, tp_rank, tp_size))
    return out


def split_tp(full: Mapping[str, torch.Tensor], cfg: WanConfig, tp_size: int) -> list[dict]:
    """Our full state dict -> one state dict per TP rank."""
    table = param_table(cfg)
    return [{p.name: full[p.name][_slice(p.shape, p.split, r, tp_size)] for p in table} for r in range(tp_size)]


def merge_tp(shards: list[Mapping[str, torch.Tensor]], cfg: WanConfig) -> dict:
    """One state dict per TP rank (in rank order) -> our full state dict."""
    out = {}
    for p in param_table(cfg):
        parts = [s[p.name] for s in shards]
        out[p.name] = parts[0] if p.split is None or len(parts) == 1 else torch.cat(parts, dim=p.split)
    return out


def _unread(keys, cfg: WanConfig) -> list[str]:
    """Keys of our state dict that the conversion table of `cfg` does not hold (TE's `_extra_state` aside)."""
    known = {p.name for p in param_table(cfg)}
    return sorted(k for k in keys if k not in known and not k.endswith("_extra_state"))


def from_ours(shards, cfg: WanConfig, layout: str) -> dict:
    """Our state dict (or one per TP rank, in rank order) -> the full state dict in `layout`; a key the table does
    not hold (it would be dropped) is refused by name."""
    shards = list(shards) if isinstance(shards, (list, tuple)) else [shards]
    unread = sorted({k for s in shards for k in _unread(s, cfg)})
    if unread:
        raise KeyError(f"{len(unread)} WanModel key(s) with no {layout} name in the conversion table: {unread}")
    full = merge_tp(shards, cfg)
    return {rename(k, layout): v for k, v in full.items()}


# -- configs ---------------------------------------------------------------------------------------

def _task(image_tokens, in_dim: int, out_dim: int) -> str:
    """'i2v' for a model that reads CLIP tokens (Wan 2.1) or conditioning channels beyond the noise (2.2 A14B)."""
    return "i2v" if image_tokens or in_dim != out_dim else "t2v"


def config_from_diffusers(c: Mapping) -> WanConfig:
    """WanConfig from a WanTransformer3DModel config."""
    if c.get("pos_embed_seq_len"):
        raise ValueError("diffusers config pos_embed_seq_len: Wan FLF2V (two-frame image tokens) is not supported")
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    if c.get("added_kv_proj_dim") not in (None, dim):
        raise ValueError(f"diffusers config added_kv_proj_dim: expected {dim} (the model width), "
                         f"found {c['added_kv_proj_dim']}")
    if c.get("qk_norm") not in (None, "rms_norm_across_heads"):
        raise ValueError(f"diffusers config qk_norm: expected 'rms_norm_across_heads' or None, found {c['qk_norm']!r}")
    return WanConfig(
        model_type=_task(c.get("image_dim"), c["in_channels"], c.get("out_channels") or c["in_channels"]),
        dim=dim, ffn_dim=c["ffn_dim"],
        freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096), num_heads=c["num_attention_heads"],
        num_layers=c["num_layers"], in_dim=c["in_channels"], out_dim=c.get("out_channels") or c["in_channels"],
        patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c.get("eps", 1e-6), qk_norm=c.get("qk_norm") is not None,
        cross_attn_norm=c.get("cross_attn_norm", True), image_dim=c.get("image_dim"),
        rope_max_seq_len=c.get("rope_max_seq_len", 1024),
    )


def config_to_diffusers(cfg: WanConfig) -> dict:
    """The WanTransformer3DModel config of `cfg`."""
    return dict(
        patch_size=list(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if cfg.qk_norm else None, eps=cfg.eps, image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.has_image_tokens else None, rope_max_seq_len=cfg.rope_max_seq_len,
    )


def config_from_original(c: Mapping) -> WanConfig:
    """WanConfig from an original Wan-AI config.json (CLIP width fixed at 1280 there)."""
    model_type = c.get("model_type", "t2v")
    if model_type not in ("t2v", "i2v"):
        raise ValueError(f"original config model_type: expected 't2v' or 'i2v', found {model_type!r}")
    return WanConfig(
        model_type=model_type, dim=c["dim"], ffn_dim=c["ffn_dim"], freq_dim=c.get("freq_dim", 256),
        text_dim=c.get("text_dim", 4096), num_heads=c["num_heads"], num_layers=c["num_layers"], in_dim=c["in_dim"],
        out_dim=c["out_dim"], patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c.get("eps", 1e-6),
        qk_norm=c.get("qk_norm", True), cross_attn_norm=c.get("cross_attn_norm", True),
        image_dim=c.get("image_dim", 1280) if model_type == "i2v" else None,
    )


def config_to_original(cfg: WanConfig) -> dict:
    """The original Wan-AI config.json of `cfg` (image_dim is kept for non-1280 test configs)."""
    out = dict(model_type=cfg.model_type, dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim,
               text_dim=cfg.text_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, in_dim=cfg.in_dim,
               out_dim=cfg.out_dim, patch_size=list(cfg.patch_size), eps=cfg.eps, qk_norm=cfg.qk_norm,
               cross_attn_norm=cfg.cross_attn_norm, window_size=[-1, -1], text_len=512)
    if cfg.has_image_tokens:
        out["image_dim"] = cfg.image_dim
    return out


def infer_config(source, layout: str, num_heads: int | None = None) -> WanConfig:
    """A WanConfig from weight shapes alone; heads default to Wan's head dim of 128."""
    keys = set(source.keys())

    def shape(ours):
        return source.shape(rename(ours, layout))

    dim, in_dim, *patch = shape("patch_embedding.weight")
    layers = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    image = rename("image_embedding.norm1.weight", layout) in keys
    heads = num_heads or dim // 128
    if not heads or dim % heads:
        raise ValueError(f"{source.where}: cannot infer the head count of a width-{dim} model; pass num_heads=")
    return WanConfig(
        model_type=_task(image, in_dim, shape("head.linear.weight")[0] // math.prod(patch)),
        dim=dim, ffn_dim=shape("blocks.0.mlp.linear_fc1.weight")[0],
        freq_dim=shape("time.time_embedding.linear_1.weight")[1], text_dim=shape("text_embedding.linear_1.weight")[1],
        num_heads=heads, num_layers=layers, in_dim=in_dim, patch_size=tuple(patch),
        out_dim=shape("head.linear.weight")[0] // math.prod(patch),
        qk_norm=rename("blocks.0.self_attention.q_norm.weight", layout) in keys,
        cross_attn_norm=rename("blocks.0.cross_norm.weight", layout) in keys,
        image_dim=shape("image_embedding.norm1.weight")[0] if image else None,
    )


_CONFIG_READERS = {"diffusers": config_from_diffusers, "original": config_from_original}


def open_source(source, layout: str, overrides: dict):
    """(source, config) from a model, a state dict, or a folder."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if (folder / "transformer" / "config.json").is_file():
            folder = folder / "transformer"
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder}: no config.json (expected a {layout} Wan transformer folder)")
        cfg = _CONFIG_READERS[layout](json.loads(config_file.read_text()))
        return SafetensorsSource(folder), cfg
    if isinstance(source, nn.Module):
        return StateDictSource(source.state_dict(), type(source).__name__), _CONFIG_READERS[layout](source.config)
    if isinstance(source, Mapping):
        src = StateDictSource(source)
        return src, infer_config(src, layout, overrides.get("num_heads"))
    raise TypeError(f"expected a model, a state dict or a folder path, found {type(source).__name__}")


def load(model_cls, source, layout: str, overrides: dict):
    """Build `model_cls` for the checkpoint in `layout`, each TP rank loading only its slice."""
    return load_from(model_cls, *open_source(source, layout, overrides), layout, overrides)


def load_from(model_cls, src, cfg: WanConfig, layout: str, overrides: dict):
    """Build `model_cls` for `cfg` (with `overrides`) from an opened source in `layout`, each TP rank loading only
    its slice."""
    cfg = cfg.replace(perform_initialization=False, **overrides)
    model = model_cls(cfg)
    state = to_ours(src, cfg, layout, parallel.tp_rank(), parallel.tp_size())
    dtype = cfg.params_dtype
    result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise KeyError(f"{src.where}: parameters of WanModel not covered by the conversion table: {missing}")
    if result.unexpected_keys:  # converted weights this WanModel has no parameter for: they would be dropped
        raise KeyError(f"{src.where}: converted weights that WanModel (layer_provider={cfg.layer_provider!r}) has "
                       f"no parameter for: {sorted(result.unexpected_keys)}")
    return model
