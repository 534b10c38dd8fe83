"""LoRA on megatron-core's tensor-parallel linears.

peft's own Megatron path (LoraParallelLinear) does not run with current peft and megatron-core
releases (it reads kwargs that peft no longer passes and treats parallel linears' (output, bias)
tuples as tensors), so the adapter layer is written here, keeping peft's names (lora_A, lora_B,
scaling, `disable_adapter()`) so adapters export to peft's format.

Column-parallel base (input whole, output split): A [r, in] is replicated and B [out/tp, r] split;
the gradient reaching A's output is all-reduced over TP so every rank's A gets the whole gradient.
Row-parallel base (input split, output whole): A [r, in/tp] is split, its partial output all-reduced,
and B [out, r] is replicated.
"""

import contextlib
import math

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import nn

from megatron_wan import parallel
from megatron_wan.models.parameters import lora_target

DEFAULT_TARGETS = ("linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1", "linear_fc2")


def _parallel_mode(module: nn.Module) -> str | None:
    """'column' or 'row' for megatron-core's and Transformer Engine's parallel linears, else None."""
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return getattr(module, "parallel_mode", None) if hasattr(module, "te_return_bias") else None


class LoRAParallelLinear(nn.Module):
    """base(x) + (alpha / rank) * B(A(x)) around a Column- or RowParallelLinear; returns (output, bias)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base
        self.column = _parallel_mode(base) == "column"
        tp = parallel.tp_size()
        weight = base.weight
        out_local, in_local = weight.shape  # column: [out/tp, in]; row: [out, in/tp]
        self.lora_A = nn.Linear(in_local, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(rank, out_local, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init: B = 0
        nn.init.zeros_(self.lora_B.weight)
        split = self.lora_B.weight if self.column else self.lora_A.weight
        split.tensor_model_parallel, split.partition_dim = tp > 1, 0 if self.column else 1
        self.scaling = alpha / rank
        self.disabled = False
        self.tp, self.tp_group = tp, parallel.tp_group()

    def forward(self, x):
        out, bias = self.base_layer(x)
        if self.disabled:
            return out, bias
        h = self.lora_A(x)
        if self.tp > 1:  # identities without TP: skipped, so that a compiled block does not break its graph here
            region = copy_to_tensor_model_parallel_region if self.column else reduce_from_tensor_model_parallel_region
            h = region(h, group=self.tp_group)
        return out + self.lora_B(h) * self.scaling, bias


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, targets=DEFAULT_TARGETS) -> nn.Module:
    """Wrap every parallel linear whose name ends in one of `targets` (models.parameters.lora_target, the rule the
    parameter description counts adapters and their FLOPs by); freeze everything but the adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        if lora_target(name, targets) and _parallel_mode(module) in ("column", "row"):
            parent, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent) if parent else model
            setattr(parent, leaf, LoRAParallelLinear(module, rank, alpha))
            wrapped += 1
    if not wrapped:
        raise ValueError(f"lora targets {list(targets)} match no parallel linear of {type(model).__name__}")
    return model


def lora_layers(model: nn.Module) -> list[LoRAParallelLinear]:
    return [m for m in model.modules() if isinstance(m, LoRAParallelLinear)]


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """The base network: every adapter off inside the block (peft's `disable_adapter`)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to disable")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def _lora_tensors(model: nn.Module):
    """(name, parameter, TP split dim or None) of every adapter weight."""
    for name, layer in model.named_modules():
        if isinstance(layer, LoRAParallelLinear):
            yield f"{name}.lora_A.weight", layer.lora_A.weight, None if layer.column else 1
            yield f"{name}.lora_B.weight", layer.lora_B.weight, 0 if layer.column else None


def lora_state_dict(model: nn.Module) -> dict:
    """This rank's adapter weights (names as in the model, TP-local shapes)."""
    return {name: p.detach() for name, p, _ in _lora_tensors(model)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, full: dict) -> None:
    """Load whole (unsplit) adapter weights, each TP rank taking its slice."""
    rank, size = parallel.tp_rank(), parallel.tp_size()
    missing = [name for name, _, _ in _lora_tensors(model) if name not in full]
    if missing:
        raise KeyError(f"LoRA weights missing: {missing}")
    for name, p, split in _lora_tensors(model):
        t = full[name]
        if split is not None:
            t = t.chunk(size, dim=split)[rank]
        if t.shape != p.shape:
            raise ValueError(f"LoRA weight {name}: expected shape {list(p.shape)} on this rank, found {list(t.shape)}")
        p.copy_(t)
