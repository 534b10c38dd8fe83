"""Run configuration: YAML files loaded into dataclasses, `key.sub=value` overrides, validation that names the key.

Every error is raised before any model is built: an unknown key (with the known ones), a wrong type, a value
out of its range (`RANGES`: beta and shift > 0, LoRA rank >= 1, ...), or an impossible combination (Ulysses
with a head count CP does not divide, LoRA settings with `finetune: full`, a world size TP x CP does not
divide, the DeepSpeed engine with TP or a non-batched pair mode). `resume_changes` compares a run's config
with the one its checkpoint was written under.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_wan.compile import MODES as COMPILE_MODES
from megatron_wan.dtypes import DTYPES, TRAINING
from megatron_wan.models import all_specs, spec_for_preset, task_names
from megatron_wan.models.wan21.config import WanConfig
from megatron_wan.models.wan21.lora import DEFAULT_TARGETS
from megatron_wan.objectives.experts import expert_problem
from megatron_wan.objectives.pair_step import PAIR_MODES
from megatron_wan.objectives.preference import BETA, MODES, sft_weight_fn
from megatron_wan.objectives.reference import KINDS
from megatron_wan.parallel.context_parallel import cp_comm_problem


class ConfigError(ValueError):
    """A configuration problem, naming the key."""


@dataclass
class ModelConfig:
    preset: str = "wan2.1-t2v-1.3b"  # architecture when `weights` is null (random init); its family loads `weights`
    weights: str | None = None  # a diffusers folder (or its transformer/), or an original Wan-AI folder
    layout: str = "diffusers"  # "diffusers" or "original"
    attention_backend: str = "auto"  # "sdpa", "flash", "te"; auto: the best present that passed gpu_check (README)
    layer_provider: str = "auto"  # "local" (megatron-core linears), "te" (Transformer Engine); auto as above
    cp_comm: str = "auto"  # "ring", "ulysses", "te", "auto"
    recompute: bool = False  # activation checkpointing per block
    compile: bool = False  # regional torch.compile: each block's forward compiled on its own (megatron_wan.compile)
    compile_mode: str = "default"  # torch.compile mode: "default" or "max-autotune-no-cudagraphs"
    init_seed: int = 0
    expert: str | None = None  # Wan 2.2 A14B: "high_noise", "low_noise" or "both" (megatron_wan.objectives.experts)
    boundary_ratio: float | None = None  # the experts' switch (t >= ratio x 1000: high noise); default: the folder's
    # model_index.json or the preset's (0.875 T2V-A14B, 0.9 I2V-A14B)


@dataclass
class DataConfig:
    dir: str = ""  # an encoded dataset (python -m data_tools encode)
    pairs: str | None = None  # default: DIR/train.jsonl
    num_workers: int = 0  # DataLoader worker processes reading batches ahead (0: read on the main thread)
    prefetch: int = 2  # batches each worker reads ahead (with num_workers > 0)
    val_pairs: str | None = None  # validation and sample pairs; default: DIR/test.jsonl
    text_len: int = 512
    on_corrupt: str = "abort"  # a sample failing its CRC32: "abort" the run, or "skip" it (counted, logged)


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))


@dataclass
class ObjectiveConfig:
    mode: str = "regdpo"  # "sft", "dpo", "regdpo"
    beta: float = BETA  # the paper's beta (Diffusion-DPO code's beta' = 2 * beta)
    sft_weight: typing.Any = "dgr"  # r: a number, "dgr", "dgr*K", "dgr/K"
    pair_mode: str = "batched"
    reference: str = "adapter"  # "adapter" (LoRA), "copy", "copy_offload"
    shift: float = 5.0  # 5.0 for 720p, 3.0 for 480p
    timestep_sampling: str = "uniform"


@dataclass
class OptimConfig:
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" or "cosine"
    min_lr: float = 0.0


@dataclass
class DeepSpeedConfig:
    config: str | None = None  # a DeepSpeed JSON to use as is; else one is generated from ours
    offload_params: bool = True
    offload_optimizer: bool = True


@dataclass
class RunConfig:
    task: str = "t2v"  # one of the model family's tasks: "t2v" or "i2v" (megatron_wan.models)
    finetune: str = "lora"  # "lora" or "full"
    engine: str = "megatron"  # "megatron" or "deepspeed"
    tensor_parallel: int = 1
    context_parallel: int = 1
    batch_size: int = 1  # pairs per data-parallel rank and micro-batch
    global_batch_size: int | None = None  # pairs per optimizer step over all data-parallel ranks (accumulating
    # micro-batches of batch_size); default batch_size x data-parallel size
    dp_shard: int = 1  # megatron engine, FSDP2 over the DP x CP ranks: 1 replicate, -1 shard over all, a divisor:
    # shard within groups of that many ranks, replicate across them (hybrid)
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (ZeRO-3) or keep until backward
    steps: int = 1000
    seed: int = 42
    dtype: str = "bf16"  # "bf16" or "fp32"
    tf32: bool = False  # CUDA fp32 matmuls on TF32 tensor cores; MFU is then against the TF32 peak, else FP32's
    output_dir: str = "outputs/run"
    save_every: int = 300
    keep_last: int = 3
    resume: bool = True  # continue from the newest checkpoint in output_dir when there is one
    log_every: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None
    empty_cache: bool = False  # torch.cuda.empty_cache() at step end (Appendix A.2 item 6)
    max_bad_steps: int = 5  # consecutive non-finite steps before the run aborts
    collapse_gap: float = 0.0  # watchdog: warn when Win Gap and Lose Gap both exceed this ...
    collapse_steps: int = 20  # ... for this many consecutive steps
    validate_every: int = 0  # validation on data.val_pairs every N steps and at the end (0: never)
    validate_pairs: int = 64  # at most this many validation pairs (the first ones)
    sample_every: int = 0  # videos of a few fixed prompts every N steps (0: never)
    sample_prompts: str | None = None  # a prompt file (.txt, or .jsonl of {prompt[, image]}); default: data.val_pairs
    sample_count: int = 2  # prompts sampled (the first of the file or of the validation pairs)
    sample_steps: int = 8  # UniPC steps of those samples
    sample_guidance_scale: float = 5.0  # their classifier-free guidance against Wan's negative prompt (<= 1: off)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "run.task": task_names(), "run.finetune": ("lora", "full"), "run.engine": ("megatron", "deepspeed"),
    "run.dtype": TRAINING, "model.layout": ("diffusers", "original"),
    "model.attention_backend": ("auto", "sdpa", "flash", "te"), "model.cp_comm": ("auto", "ring", "ulysses", "te"),
    "model.layer_provider": ("auto", "local", "te"), "model.compile_mode": COMPILE_MODES,
    "objective.mode": MODES, "objective.pair_mode": PAIR_MODES, "objective.reference": KINDS,
    "objective.timestep_sampling": ("uniform", "logit_normal"), "optim.schedule": ("constant", "cosine"),
    "data.on_corrupt": ("abort", "skip"),
}

# key: (lowest, whether the lowest itself is allowed, highest or None); every bound is finite
RANGES = {
    "run.tensor_parallel": (1, True, None), "run.context_parallel": (1, True, None), "run.batch_size": (1, True, None),
    "run.steps": (1, True, None), "run.seed": (0, True, 2**63 - 1), "run.save_every": (1, True, None),
    "run.keep_last": (1, True, None), "run.log_every": (1, True, None), "run.max_bad_steps": (1, True, None),
    "run.collapse_gap": (0, True, None), "run.collapse_steps": (1, True, None),
    "model.init_seed": (0, True, 2**63 - 1),
    "run.validate_every": (0, True, None), "run.validate_pairs": (1, True, None), "run.sample_every": (0, True, None),
    "run.sample_count": (1, True, None), "run.sample_steps": (1, True, None),
    "run.sample_guidance_scale": (0, True, None),
    "data.num_workers": (0, True, None), "data.prefetch": (1, True, None), "data.text_len": (1, True, None),
    "lora.rank": (1, True, None), "lora.alpha": (0, False, None),
    "objective.beta": (0, False, None), "objective.shift": (0, False, None),
    "optim.lr": (0, False, None), "optim.weight_decay": (0, True, None), "optim.eps": (0, False, None),
    "optim.grad_clip": (0, True, None), "optim.warmup_steps": (0, True, None), "optim.min_lr": (0, True, None),
}

# What a resumed run may change: everything outside these sections and keys, and these exceptions inside them.
# The rest changes what is computed (or is restored from the optimizer state and would be silently ignored).
RESUME_FIXED = ("objective", "model", "lora", "data", "run.task", "run.finetune", "run.seed", "run.dtype",
                "run.batch_size", "run.engine", "optim.betas", "optim.eps", "optim.weight_decay")
RESUME_FREE = ("model.attention_backend", "model.layer_provider", "model.cp_comm", "model.recompute",
               "model.compile", "model.compile_mode",
               "data.num_workers", "data.prefetch", "data.val_pairs", "data.on_corrupt")


def _check_type(key: str, value, hint):
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return value
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _check_type(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {hint}, found {type(value).__name__} {value!r}")
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is list and isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, found {type(value).__name__} {value!r}")
    return value


def build_dataclass(cls, values, prefix: str):
    """`cls` from a nested mapping, every key and type checked; errors name the key (`prefix` + name)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, found {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; known keys of {prefix.rstrip('.') or 'config'}: "
                          f"{sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        key, hint = prefix + name, hints[name]
        inner = [t for t in typing.get_args(hint) if dataclasses.is_dataclass(t)]
        target = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner else None)
        if target is not None and value is not None:
            kwargs[name] = build_dataclass(target, value, key + ".")
        else:
            kwargs[name] = _check_type(key, value, hint)
    return cls(**kwargs)


def _merge(base: dict, key: str, value):
    node = base
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path=None, overrides=()) -> Config:
    """The Config of YAML `path` (or the defaults) with `key.sub=value` overrides (values parsed as YAML)."""
    values = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        _merge(values, key.strip(), yaml.safe_load(raw))
    cfg = build_dataclass(Config, values, "")
    validate(cfg)
    return cfg


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_range(key: str, value, low, inclusive: bool, high) -> None:
    ok = math.isfinite(value) and (value >= low if inclusive else value > low) and (high is None or value <= high)
    if not ok:
        expected = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"{key}: expected {expected}, found {value}")


def check_cp_comm(cfg: Config, latent_shapes) -> None:
    """An explicit model.cp_comm that cannot run this model, dtype (and, given them, these latent shapes)."""
    m, run = cfg.model, cfg.run
    arch = spec_for_preset(m.preset).config(m.preset) if m.weights is None else None
    heads = arch.num_heads // run.tensor_parallel if arch else None
    head_dim = arch.head_dim if arch else 128  # Wan's
    grids = sorted({tuple(n // p for n, p in zip(shape[-3:], (arch or WanConfig()).patch_size))
                    for shape in latent_shapes or ()})
    if heads is None and m.cp_comm == "ulysses":
        return  # a checkpoint's head count is known when the model is loaded (CoreAttention checks it)
    problem = cp_comm_problem(m.cp_comm, m.attention_backend, run.context_parallel, heads or 0, head_dim,
                              DTYPES[run.dtype], grids)
    if problem and m.cp_comm == "ulysses":
        raise ConfigError(f"model.cp_comm: ulysses needs the heads per TP rank ({heads}) divisible by "
                          f"run.context_parallel={run.context_parallel}; use ring")
    if problem:
        raise ConfigError(f"model.cp_comm: {m.cp_comm} cannot run here: {problem}; use ring (or auto)")


def validate(cfg: Config, world_size: int | None = None, latent_shapes=None) -> None:
    """Raise ConfigError naming the key of any impossible setting; `world_size` checks the layout too, and the
    data's `latent_shapes` ([C, F, H, W] each) what an explicit model.cp_comm must be able to run."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, found {_get(cfg, key)!r}")
    run, obj = cfg.run, cfg.objective
    if cfg.lora is None:
        ranges = {k: v for k, v in RANGES.items() if not k.startswith("lora.")}
    else:
        ranges = RANGES
    for key, (low, inclusive, high) in ranges.items():
        _check_range(key, _get(cfg, key), low, inclusive, high)
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr: expected <= optim.lr = {cfg.optim.lr}, found {cfg.optim.min_lr}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), found {betas!r}")
    if cfg.lora is not None and (not cfg.lora.targets or not all(isinstance(t, str) and t for t in cfg.lora.targets)):
        raise ConfigError(f"lora.targets: expected a non-empty list of layer names (e.g. {list(DEFAULT_TARGETS)}), "
                          f"found {cfg.lora.targets!r}")
    if not run.output_dir:
        raise ConfigError("run.output_dir: expected a directory, found an empty string")
    presets = [p for spec in all_specs() for p in spec.presets]
    if cfg.model.weights is None and cfg.model.preset not in presets:
        raise ConfigError(f"model.preset: unknown {cfg.model.preset!r}; known: {sorted(presets)}")
    if obj.mode != "sft":
        try:
            sft_weight_fn(obj.sft_weight)
        except ValueError as e:
            raise ConfigError(f"objective.sft_weight: {e}") from None
    if run.finetune == "full":
        if cfg.lora is not None:
            raise ConfigError("lora: LoRA settings given with run.finetune=full; remove the lora section "
                              "(lora: null) or use run.finetune=lora")
        if obj.reference == "adapter" and obj.mode != "sft":
            raise ConfigError("objective.reference: 'adapter' needs run.finetune=lora; use copy or copy_offload")
    elif cfg.lora is None:
        raise ConfigError("lora: run.finetune=lora needs the lora section (rank, alpha, targets)")
    if run.engine == "deepspeed":
        if run.tensor_parallel != 1:
            raise ConfigError("run.tensor_parallel: the deepspeed engine shards with ZeRO-3, not TP; use 1")
        if obj.pair_mode != "batched":
            raise ConfigError("objective.pair_mode: the deepspeed engine runs one backward per step; use batched")
    if run.dp_shard == 0 or run.dp_shard < -1:
        raise ConfigError(f"run.dp_shard: expected -1 (shard over all data-parallel ranks) or >= 1, found "
                          f"{run.dp_shard}")
    if run.engine == "deepspeed" and run.dp_shard != 1:
        raise ConfigError("run.dp_shard: the deepspeed engine shards with ZeRO-3; use 1")
    if run.engine == "deepspeed" and cfg.model.compile:
        raise ConfigError("model.compile: the deepspeed engine gathers ZeRO-3 parameters in hooks on every layer "
                          "inside the block, which a compiled block would trace; use run.engine=megatron")
    if run.global_batch_size is not None and run.global_batch_size < 1:
        raise ConfigError(f"run.global_batch_size: expected >= 1, found {run.global_batch_size}")
    if obj.pair_mode == "ranks" and run.context_parallel != 1:
        raise ConfigError("objective.pair_mode: 'ranks' pairs data-parallel ranks; it needs run.context_parallel=1")
    problem = expert_problem(cfg)
    if problem:
        raise ConfigError(problem)
    check_cp_comm(cfg, latent_shapes)
    if world_size is not None:
        mp = run.tensor_parallel * run.context_parallel
        if world_size % mp:
            raise ConfigError(f"run.tensor_parallel x run.context_parallel = {mp} does not divide the world size "
                              f"{world_size}")
        if obj.pair_mode == "ranks" and (world_size // mp) % 2:
            raise ConfigError(f"objective.pair_mode: 'ranks' needs an even data-parallel size, found "
                              f"{world_size // mp}")
        dp_cp = world_size // run.tensor_parallel
        if run.dp_shard != -1 and dp_cp % run.dp_shard:
            raise ConfigError(f"run.dp_shard: {run.dp_shard} does not divide the data-parallel x context-parallel "
                              f"size {dp_cp}")
        accumulation_steps(cfg, world_size)


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step: run.global_batch_size / (run.batch_size x pair-holding DP ranks)."""
    run = cfg.run
    dp = world_size // (run.tensor_parallel * run.context_parallel)
    if cfg.objective.pair_mode == "ranks" and cfg.objective.mode != "sft":
        dp //= 2  # two partner ranks hold one pair
    per_step = run.batch_size * dp
    total = run.global_batch_size or per_step
    if total % per_step:
        raise ConfigError(f"run.global_batch_size: {total} is not a multiple of run.batch_size x data-parallel "
                          f"size = {run.batch_size} x {dp}")
    if run.engine == "deepspeed" and total != per_step:
        raise ConfigError("run.global_batch_size: the deepspeed engine runs one micro-batch per step; use "
                          f"{per_step} (run.batch_size x data-parallel size)")
    return total // per_step


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for name, value in values.items():
        if isinstance(value, dict) and prefix.count(".") < 1:
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out


def resume_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(refused, allowed): 'key: old -> new' for every key whose value differs between the config a checkpoint
    was written under (`saved`, `Config.to_dict()`) and `cfg`; refused are the ones that change the math."""
    old, new = _flat(saved), _flat(cfg.to_dict())
    refused, allowed = [], []
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new or old[key] == new[key]:
            continue  # a key only one side knows (another version of this code) is not a change of setting
        fixed = key not in RESUME_FREE and any(key == f or key.startswith(f + ".") for f in RESUME_FIXED)
        (refused if fixed else allowed).append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return refused, allowed
