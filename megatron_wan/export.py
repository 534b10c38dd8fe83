"""python -m megatron_wan.export CHECKPOINT --out DIR [--formats ...] [--base FOLDER] [--dtype bf16]

A training checkpoint (Megatron engine in any TP/CP layout, or DeepSpeed ZeRO-3; LoRA or full fine-tune) in the
formats other tools load. CHECKPOINT is a step folder, a run's checkpoints/ folder or its output dir (newest step).

  transformer  DIR/transformer/: a diffusers WanTransformer3DModel folder (config.json, sharded safetensors and their
               index). A LoRA run's adapters are merged into its base weights (model.weights of the run, or --base).
  peft         DIR/peft/: adapter_config.json + adapter_model.safetensors (`PeftModel.from_pretrained(transformer,
               DIR/peft)`), keys `base_model.model.blocks.0.attn1.to_q.lora_A.weight`.
  diffusers    DIR/diffusers/pytorch_lora_weights.safetensors (`pipe.load_lora_weights(DIR/diffusers)`), keys
               `transformer.blocks.0.attn1.to_q.lora_A.weight`, rank and alpha in the file's LoRA metadata.
  comfyui      DIR/comfyui/lora.safetensors: original Wan module names with ComfyUI's prefix and kohya's naming,
               `diffusion_model.blocks.0.self_attn.q.lora_down.weight`, `.lora_up.weight` and `.alpha`: what ComfyUI's
               LoRA loader reads, and diffusers' Wan loader too.

A run of Wan 2.2 A14B's experts (model.expert) is written per expert, each against its own transformer of the base
folder: the merged transformers as DIR/transformer/ (high noise) and DIR/transformer_2/ (low noise), which
`WanPipeline.from_pretrained(BASE, transformer=..., transformer_2=...)` takes, and the adapters as a pair
DIR/FORMAT/high_noise/ and DIR/FORMAT/low_noise/ (`pipe.load_lora_weights(DIR/diffusers/low_noise,
load_into_transformer_2=True)`); a run of one expert writes only that expert's.

Default: the three adapter formats for a LoRA run, the transformer for a full fine-tune. Each is written under a
temporary name and renamed when complete. DeepSpeed checkpoints are consolidated with DeepSpeed's own
zero_to_fp32 (which unpickles its files); Megatron ones (torch.distributed.checkpoint, sharded over any number of
data-parallel ranks) are read whole in this one process, without pickle for the tensors.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_wan import checkpointing
from megatron_wan.dtypes import DTYPES
from megatron_wan.engines.megatron import ENGINE_DIR, tp_key
from megatron_wan.files import atomic_path
from megatron_wan.models import spec_for_preset
from megatron_wan.models.wan21 import WanConfig, adapter

ADAPTER_FORMATS = ("peft", "diffusers", "comfyui")
FORMATS = ("transformer", *ADAPTER_FORMATS)
LORA_PARTS = ("lora_A", "lora_B")


@dataclass
class Trained:
    """A checkpoint's trainable weights merged over TP (our names, whole shapes) and what they belong to."""

    path: Path
    step: int
    config: dict  # the run's config
    wan: WanConfig
    base: object  # the base weights (a convert source), None for a randomly initialized run
    weights: dict  # every parameter (full fine-tune) or the adapters (LoRA)

    @property
    def lora(self) -> dict | None:
        """rank, alpha, targets of a LoRA run, else None."""
        return self.config["lora"] if self.config["run"]["finetune"] == "lora" else None


def find_checkpoint(path) -> Path:
    """A step folder, else the newest complete one under `path`/checkpoints or `path`."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = checkpointing.latest(root)
        if found:
            return found
    raise FileNotFoundError(f"{path}: no checkpoint (expected a step folder with trainer.json, a checkpoints/ "
                            f"folder or a run's output dir)")


def _base(model: dict, base, expert: str | None = None) -> tuple[object, WanConfig]:
    """(weights source or None, WanConfig) of the run's model (of its Wan 2.2 `expert`): `base`, else model.weights,
    else model.preset (whose family reads the folder)."""
    spec = spec_for_preset(model["preset"])
    folder = base or model["weights"]
    if folder is None:
        return None, spec.config(model["preset"])
    if not Path(folder).exists():
        raise FileNotFoundError(f"{folder}: the run's base model folder (model.weights) does not exist; pass the "
                                f"base folder (--base)")
    return spec.adapter.open_source(folder, model["layout"], {} if expert is None else {"expert": expert})


def _rank_weights(path: Path, run: dict) -> list[dict]:
    """The trainable weights of each TP rank, in rank order."""
    if run["engine"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if not (path / "engine").is_dir():
            raise FileNotFoundError(f"{path / 'engine'}: missing (the DeepSpeed engine's checkpoint tag)")
        return [dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag="engine", exclude_frozen_parameters=True))]
    return read_engine_weights(path / ENGINE_DIR, run["tensor_parallel"])


def read_engine_weights(engine_dir: Path, tensor_parallel: int) -> list[dict]:
    """The Megatron engine's DCP checkpoint `engine_dir` as whole tensors, one dict per TP rank (no process group:
    DCP assembles each weight from the shards of however many data-parallel ranks wrote it). Non-tensor entries
    (megatron-core's `_extra_state`) are not weights and are left out."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (engine_dir / ".metadata").is_file():
        raise FileNotFoundError(f"{engine_dir}: missing (the Megatron engine's checkpoint, written by DCP)")
    reader = dcp.FileSystemReader(str(engine_dir))
    stored = reader.read_metadata().state_dict_metadata
    template = {}
    for r in range(tensor_parallel):
        prefix = f"{tp_key(r)}.model."
        keys = [k for k in stored if k.startswith(prefix) and isinstance(stored[k], TensorStorageMetadata)]
        if not keys:
            raise FileNotFoundError(f"{engine_dir}: run.tensor_parallel={tensor_parallel} but no weights of TP rank "
                                    f"{r} ({prefix}*)")
        template[tp_key(r)] = {"model": {k[len(prefix):]: torch.empty(stored[k].size, dtype=stored[k].properties.dtype)
                                         for k in keys}}
    dcp.load(template, storage_reader=reader, no_dist=True)
    return [template[tp_key(r)]["model"] for r in range(tensor_parallel)]


def _module(key: str) -> tuple[str, str]:
    """'blocks.0.self_attention.linear_q.lora_A.weight' -> ('blocks.0.self_attention.linear_q', 'lora_A')."""
    module, _, part = key.removesuffix(".weight").rpartition(".")
    if part not in LORA_PARTS or not key.endswith(".weight"):
        raise KeyError(f"{key}: not a LoRA adapter weight (MODULE.lora_A.weight or MODULE.lora_B.weight)")
    return module, part


def merge_adapters(shards: list[dict], cfg: WanConfig, where: str) -> dict:
    """Adapters of each TP rank (rank order) -> whole ones. A column-parallel base (split on its output) splits B
    on dim 0, a row-parallel one (split on its input) A on dim 1; the other factor is replicated (see model.lora)."""
    base_split = {p.name: p.split for p in adapter.param_table(cfg)}
    out = {}
    for key in shards[0]:
        module, part = _module(key)
        if f"{module}.weight" not in base_split:
            raise KeyError(f"{where}: adapter {key} sits on no linear layer of this model ({module}.weight)")
        split = {("lora_B", 0): 0, ("lora_A", 1): 1}.get((part, base_split[f"{module}.weight"]))
        parts = [s[key] for s in shards]
        out[key] = parts[0] if split is None else torch.cat(parts, dim=split)
    return out


def run_experts(config: dict) -> tuple[str, ...]:
    """The Wan 2.2 experts a run's config trains (model.expert: one of them, or both), () for one model."""
    from megatron_wan.models.wan22 import EXPERTS

    expert = config["model"].get("expert")
    return () if expert is None else EXPERTS if expert == "both" else (expert,)


def _trainer_state(path) -> tuple[Path, dict]:
    path = find_checkpoint(path)
    return path, json.loads((path / "trainer.json").read_text())


def _trained(path: Path, state: dict, base, shards: list[dict], expert: str | None = None) -> Trained:
    """The `Trained` of one model (of one expert) from its weights of each TP rank."""
    config = state["config"]
    source, cfg = _base(config["model"], base, expert)
    where = str(path) if expert is None else f"{path} ({expert} expert)"
    if config["run"]["finetune"] == "lora":
        weights = merge_adapters(shards, cfg, where)
    else:
        missing = [p.name for p in adapter.param_table(cfg) if p.name not in shards[0]]
        if missing:
            raise KeyError(f"{where}: {len(missing)} parameter(s) of the model missing from the engine weights: "
                           f"{missing}")
        weights = adapter.merge_tp(shards, cfg)
    return Trained(path, state["step"], config, cfg, source, weights)


def read_checkpoint(path, base=None) -> Trained:
    """A checkpoint's weights merged over TP; `base` replaces the run's model.weights folder (moved or relative)."""
    path, state = _trainer_state(path)
    experts = run_experts(state["config"])
    if experts:
        raise ValueError(f"{path}: a run of the Wan 2.2 experts {list(experts)} (model.expert); read it with "
                         f"read_experts")
    return _trained(path, state, base, _rank_weights(path, state["config"]["run"]))


def split_experts(shards: list[dict], experts: tuple[str, ...], where: str) -> dict[str, list[dict]]:
    """The engine weights of each TP rank, per expert: a run of one expert holds its weights under their own names,
    one of both (objectives.experts.Experts) under `high_noise.` and `low_noise.`."""
    if len(experts) == 1:
        return {experts[0]: shards}
    out = {e: [{k[len(e) + 1:]: v for k, v in s.items() if k.startswith(f"{e}.")} for s in shards] for e in experts}
    stray = sorted(k for k in shards[0] if k.split(".", 1)[0] not in experts)
    empty = [e for e in experts if not out[e][0]]
    if stray or empty:
        raise KeyError(f"{where}: model.expert=both, expected weights under {[f'{e}.' for e in experts]}; "
                       + (f"found {stray[:3]} outside them" if stray else f"none under {empty}"))
    return out


def read_experts(path, base=None) -> dict[str, Trained]:
    """{expert: Trained} of a Wan 2.2 expert run's checkpoint (model.expert: the one expert, or both), each merged
    over TP against its own transformer of the base folder; `base` as in read_checkpoint."""
    path, state = _trainer_state(path)
    experts = run_experts(state["config"])
    if not experts:
        raise ValueError(f"{path}: not a run of Wan 2.2 experts (model.expert is null); read it with read_checkpoint")
    shards = split_experts(_rank_weights(path, state["config"]["run"]), experts, str(path))
    return {e: _trained(path, state, base, shards[e], e) for e in experts}


# -- formats ---------------------------------------------------------------------------------------

def adapter_pairs(adapters: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our module name: (A [r, in], B [out, r])}."""
    modules = sorted({_module(k)[0] for k in adapters})
    return {m: (adapters[f"{m}.lora_A.weight"], adapters[f"{m}.lora_B.weight"]) for m in modules}


def module_name(module: str, layout: str) -> str:
    """Our module name -> its name in `layout` ('diffusers' or 'original')."""
    return adapter.rename(f"{module}.weight", layout).removesuffix(".weight")


def lora_config(trained: Trained) -> dict:
    """peft LoraConfig arguments: rank, alpha and the (diffusers) names of the modules that carry adapters."""
    modules = adapter_pairs(trained.weights)
    return {"r": trained.lora["rank"], "lora_alpha": trained.lora["alpha"],
            "target_modules": sorted(module_name(m, "diffusers") for m in modules)}


def diffusers_adapters(adapters: dict) -> dict:
    """Adapter weights under diffusers' WanTransformer3DModel names ('blocks.0.attn1.to_q.lora_A.weight')."""
    return {adapter.rename(k, "diffusers"): v for k, v in adapters.items()}


def write_peft(trained: Trained, adapters: dict, folder: Path) -> None:
    from peft import LoraConfig

    LoraConfig(**lora_config(trained)).save_pretrained(str(folder))
    tensors = {f"base_model.model.{k}": v for k, v in diffusers_adapters(adapters).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_diffusers(trained: Trained, adapters: dict, folder: Path) -> None:
    from diffusers.loaders import WanLoraLoaderMixin

    WanLoraLoaderMixin.save_lora_weights(str(folder), transformer_lora_layers=diffusers_adapters(adapters),
                                         transformer_lora_adapter_metadata=lora_config(trained))


def write_comfyui(trained: Trained, adapters: dict, folder: Path) -> None:
    alpha = float(trained.lora["alpha"])
    tensors = {}
    for module, (a, b) in adapter_pairs(adapters).items():
        name = f"diffusion_model.{module_name(module, 'original')}"
        tensors.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b,
                        f"{name}.alpha": torch.tensor(alpha)})
    save_file(tensors, str(folder / "lora.safetensors"), metadata={"format": "pt"})


def merged_weights(trained: Trained) -> dict:
    """Our full state dict: the fine-tuned weights, or the base with W + (alpha / rank) * B @ A (in fp32)."""
    if trained.lora is None:
        return trained.weights
    if trained.base is None:
        raise ValueError(f"{trained.path}: model.weights is null (a randomly initialized base) so there are no base "
                         f"weights to merge the adapters into; export the adapters instead")
    layout = trained.config["model"]["layout"]
    full = adapter.to_ours(trained.base, trained.wan, layout)
    scaling = trained.lora["alpha"] / trained.lora["rank"]
    for module, (a, b) in adapter_pairs(trained.weights).items():
        w = full[f"{module}.weight"]
        full[f"{module}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return full


def write_transformer(trained: Trained, dtype, folder: Path, max_shard_size) -> None:
    from diffusers import WanTransformer3DModel
    from huggingface_hub import save_torch_state_dict

    state = adapter.from_ours(merged_weights(trained), trained.wan, "diffusers")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        WanTransformer3DModel(**adapter.config_to_diffusers(trained.wan)).save_config(str(folder))
    save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=max_shard_size)


def write_formats(trained: Trained, targets: dict[str, Path], torch_dtype, max_shard_size) -> None:
    """Write `trained` in each format of `targets` ({format: folder}), each folder renamed into place when whole."""
    adapters = trained.weights
    if torch_dtype is not None and trained.lora:
        adapters = {k: v.to(torch_dtype) for k, v in adapters.items()}
    writers = {"peft": write_peft, "diffusers": write_diffusers, "comfyui": write_comfyui}
    for fmt, final in targets.items():
        with atomic_path(final, folder=True) as tmp:
            if fmt == "transformer":
                write_transformer(trained, torch_dtype, tmp, max_shard_size)
            else:
                writers[fmt](trained, adapters, tmp)


def expert_targets(out, formats, experts) -> dict[str, dict[str, Path]]:
    """Where each Wan 2.2 expert's formats go: the merged transformers as the pipeline's `transformer/` (high noise)
    and `transformer_2/` (low noise), the adapters as a pair FORMAT/high_noise/ and FORMAT/low_noise/."""
    from megatron_wan.models.wan22 import DIFFUSERS_FOLDERS

    out = Path(out)
    return {e: {f: out / DIFFUSERS_FOLDERS[e] if f == "transformer" else out / f / e for f in formats}
            for e in experts}


def export_experts(trained: dict, out, formats, dtype: str | None = None, max_shard_size="5GB") -> dict:
    """Wan 2.2 A14B: write each expert's `Trained` ({'high_noise': ..., 'low_noise': ...}) at `expert_targets`:
    `WanPipeline.from_pretrained(BASE, transformer=..., transformer_2=...)` takes the two transformer folders;
    `pipe.load_lora_weights(OUT/diffusers/high_noise)` and `(OUT/diffusers/low_noise, load_into_transformer_2=True)`
    the adapter pair. Returns {expert: {format: path}}."""
    from megatron_wan.models.wan22 import EXPERTS

    unknown = sorted(set(trained) - set(EXPERTS)) + [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"export_experts: unknown expert(s) or format(s) {unknown}; experts {list(EXPERTS)}, "
                         f"formats {list(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, found {dtype!r}")
    targets = expert_targets(out, formats, trained)
    for expert, t in trained.items():
        write_formats(t, targets[expert], DTYPES.get(dtype), max_shard_size)
    return targets


def export(checkpoint, out, formats=None, base=None, dtype: str | None = None, max_shard_size="5GB",
           overwrite: bool = False) -> dict:
    """Write `checkpoint` to `out`/FORMAT for each of `formats` (default: the adapter formats of a LoRA run, the
    transformer of a full fine-tune); `dtype` ('fp32', 'bf16', 'fp16') casts the written weights (default: as
    trained, the merged transformer as its base). Returns {format: path}. A run of Wan 2.2 experts (model.expert) is
    written per expert by export_experts (`transformer/`, `transformer_2/`, FORMAT/high_noise/, FORMAT/low_noise/;
    a one-expert run only its own) and returns {expert: {format: path}}."""
    path, state = _trainer_state(checkpoint)
    experts = run_experts(state["config"])
    trained = read_experts(path, base) if experts else {None: read_checkpoint(path, base)}
    first = next(iter(trained.values()))
    formats = tuple(formats or (ADAPTER_FORMATS if first.lora else ("transformer",)))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats: {unknown} unknown; expected some of {list(FORMATS)}")
    if not first.lora and set(formats) & set(ADAPTER_FORMATS):
        raise ValueError(f"formats: {sorted(set(formats) & set(ADAPTER_FORMATS))} need LoRA adapters; "
                         f"{first.path} is a full fine-tune (run.finetune=full): export 'transformer'")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, found {dtype!r}")
    out = Path(out)
    targets = expert_targets(out, formats, trained) if experts else {None: {f: out / f for f in formats}}
    existing = [str(p) for t in targets.values() for p in t.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing} exist; remove them or pass overwrite=True (--overwrite)")
    if experts:
        export_experts(trained, out, formats, dtype, max_shard_size)
    else:
        write_formats(first, targets[None], DTYPES.get(dtype), max_shard_size)
    run = first.config["run"]
    kind = f"LoRA rank {first.lora['rank']} alpha {first.lora['alpha']}" if first.lora else "full fine-tune"
    written = ", ".join(f"{fmt} {p}" for t in targets.values() for fmt, p in t.items())
    print(f"export: step {first.step} of {first.path} ({kind}, {run['engine']} engine, TP={run['tensor_parallel']}"
          + (f", experts {'+'.join(experts)}" if experts else "") + f") -> {written}")
    return targets if experts else targets[None]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m megatron_wan.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step folder, a run's checkpoints/ folder or its output dir")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per format)")
    parser.add_argument("--formats", help=f"comma-separated, of {','.join(FORMATS)}")
    parser.add_argument("--base", help="the base model folder, when the run's model.weights has moved")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the written weights (default: as trained)")
    parser.add_argument("--max-shard-size", default="5GB", help="transformer shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing format folders")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        written = export(args.checkpoint, args.out, args.formats.split(",") if args.formats else None, args.base,
                         args.dtype, args.max_shard_size, args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        sys.exit(f"megatron_wan.export: {e.args[0] if isinstance(e, KeyError) else e}")
    return written


if __name__ == "__main__":
    main()
