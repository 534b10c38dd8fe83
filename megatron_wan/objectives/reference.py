"""The reference model y_ref of Diffusion-DPO, three ways (config `reference`).

- `adapter`: with LoRA, the policy itself with its adapters disabled; no second copy of the weights.
- `copy`: a frozen copy of the policy taken at start, on the device.
- `copy_offload`: the frozen copy lives in CPU memory (pinned when CUDA is present); for each forward its
  modules are streamed to the device one at a time and released right after (Appendix A.2, item 5).

Every reference pass runs under torch.no_grad and builds no graph.
"""

import torch
from torch import nn

from megatron_wan.models.wan21.lora import LoRAParallelLinear, disable_adapter, lora_layers
from megatron_wan.objectives.experts import Experts

KINDS = ("adapter", "copy", "copy_offload")


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    owner, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner) if owner else module
    if parameter:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _frozen_copy(model: nn.Module, device=None) -> nn.Module:
    """A second WanModel of `model`'s config (and LoRA layout) holding copies of its tensors, on `device` (default:
    where each tensor is). Built on the meta device and filled, not deep-copied: process groups and Transformer
    Engine's CUDA streams are created anew, never copied, and no throwaway weights are allocated. Wan 2.2's
    `Experts`: a copy of each expert."""
    if isinstance(model, Experts):
        return Experts(*(_frozen_copy(m, device) for m in model.experts), model.boundary_ratio).eval()
    with torch.device("meta"):
        ref = type(model)(model.wan.replace(perform_initialization=False))
        for name, layer in model.named_modules():
            if isinstance(layer, LoRAParallelLinear):
                rank = layer.lora_A.out_features
                parent, _, leaf = name.rpartition(".")
                parent = ref.get_submodule(parent) if parent else ref
                setattr(parent, leaf, LoRAParallelLinear(getattr(parent, leaf), rank, layer.scaling * rank))
    with torch.no_grad():
        for parameter, tensors in ((True, model.named_parameters()), (False, model.named_buffers())):
            for name, t in tensors:
                _set_tensor(ref, name, t.detach().to(device or t.device, copy=True), parameter)
    left = [n for n, t in [*ref.named_parameters(), *ref.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"reference copy: {type(model).__name__} tensors not copied from the policy: {left}")
    return ref.eval()


class AdapterReference:
    def __init__(self, model: nn.Module):
        if not lora_layers(model):
            raise ValueError("reference=adapter needs a LoRA model (finetune: lora); use copy or copy_offload")
        self.model = model

    @torch.no_grad()
    def __call__(self, *inputs, **kwargs):
        with disable_adapter(self.model):
            return self.model(*inputs, **kwargs)


class CopyReference:
    def __init__(self, model: nn.Module):
        self.model = _frozen_copy(model)

    @torch.no_grad()
    def __call__(self, *inputs, **kwargs):
        return self.model(*inputs, **kwargs)


class OffloadedCopyReference:
    """A frozen copy kept on `offload_device`; each streamed module is copied to the compute device for
    its own forward and dropped after it, so at most one block's weights sit on the device at a time."""

    def __init__(self, model: nn.Module, offload_device: str = "cpu"):
        self.device = next(model.parameters()).device
        self.model = _frozen_copy(model, offload_device)
        self.host = {}
        if torch.cuda.is_available():
            for p in self.model.parameters():
                p.data = p.data.pin_memory()
        streamed = [m for name, m in self.model.named_children() if name != "blocks"] + list(self.model.blocks)
        self.loads = 0
        for module in streamed:
            module.register_forward_pre_hook(self._load)
            module.register_forward_hook(self._release)

    def _load(self, module, _inputs):
        self.loads += 1
        for p in module.parameters():
            self.host[p] = p.data
            p.data = p.data.to(self.device, non_blocking=True)

    def _release(self, module, _inputs, _output):
        for p in module.parameters():
            p.data = self.host.pop(p)

    @torch.no_grad()
    def __call__(self, *inputs, **kwargs):
        return self.model(*inputs, **kwargs)


def make_reference(kind: str, model: nn.Module):
    """The reference of `kind` for the policy `model` (taken now, before any update)."""
    if kind == "adapter":
        return AdapterReference(model)
    if kind == "copy":
        return CopyReference(model)
    if kind == "copy_offload":
        return OffloadedCopyReference(model)
    raise ValueError(f"reference: expected one of {KINDS}, found {kind!r}")
