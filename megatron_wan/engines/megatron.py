"""The Megatron-Core engine: TP and CP inside the model (megatron-core parallel state), data parallelism by PyTorch
FSDP2 over the DP x CP ranks (megatron_wan.parallel.parallelize; `run.dp_shard` 1 replicates, -1 shards fully,
a divisor in between is hybrid), fp32 master weights, optimizer state and gradient reduction.

A step may run several backward passes (`pair_mode: sequential`, gradient accumulation): the trainer announces
how many with `begin_step(n)`; FSDP2 reduces (reduce-scatter / all-reduce) only in the last one
(`set_requires_gradient_sync`). The global gradient norm is torch's over the DTensor gradients, TP-split
parameters summed over the TP group. Checkpoints go through torch.distributed.checkpoint (DCP), sharded per rank:
a run resumes on another data-parallel size, the weights and the optimizer state resharded.
"""

import math

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import parallel_state as ps
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from megatron_wan.engines import make_optimizer
from megatron_wan.parallel.parallelize import data_parallel_mesh, parallelize

ENGINE_DIR = "engine"  # the DCP checkpoint inside a step folder
_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def tp_key(tp_rank: int) -> str:
    """The top-level key of one TP rank's weights and optimizer state in the DCP checkpoint: TP-split weights
    differ between TP ranks under the same name, so each TP rank has its own name space (DP and CP ranks share
    it and DCP reshards over them)."""
    return f"tp{tp_rank:02d}"


def weights_only(state: dict) -> dict:
    """A model state dict without modules' `_extra_state`: Transformer Engine's (its FP8 metadata, an empty tensor
    without FP8, which this project does not run) and megatron-core's linears' (None). DCP requires every key a
    load asks for, so keeping them would make a resume after changing model.layer_provider or attention_backend
    (or `auto` turning to TE) fail on the other provider's keys."""
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def _full_norm(grads) -> torch.Tensor:
    """The 2-norm of `grads` (DTensors or tensors) over all their shards, as a plain fp32 tensor."""
    if not grads:
        return torch.zeros(())
    norm = get_total_norm(grads, foreach=None)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()


class MegatronEngine:
    def __init__(self, cfg, model: torch.nn.Module, reference: torch.nn.Module | None = None):
        run = cfg.run
        # TP-split parameters (megatron's attribute does not survive FSDP's DTensor parameters): by name
        split = {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
        self.mesh = data_parallel_mesh(run.dp_shard)
        self.model = self.module = parallelize(model, self.mesh, dtype=run.dtype,
                                               reshard_after_forward=run.reshard_after_forward)
        if reference is not None:  # a frozen copy: sharded the same way, never reduced
            parallelize(reference, self.mesh, dtype=run.dtype, reshard_after_forward=run.reshard_after_forward)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters (finetune: lora with no matching targets?)")
        self.params = [p for _, p in named]
        self.split = [p for n, p in named if n in split]
        self.whole = [p for n, p in named if n not in split]
        self.optimizer = make_optimizer(cfg, self.params)
        self.grad_clip = cfg.optim.grad_clip
        self.cp = ps.get_context_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.backwards_left = 1

    def begin_step(self, backwards: int) -> None:
        """The next optimizer step takes `backwards` backward passes; gradients reduce in the last one."""
        self.backwards_left = backwards

    def backward(self, loss: torch.Tensor) -> None:
        self.backwards_left -= 1
        last = self.backwards_left <= 0
        self.model.set_requires_gradient_sync(last)
        self.model.set_is_last_backward(last)
        (loss * self.cp).backward()

    def grad_norm(self) -> torch.Tensor:
        """The global gradient 2-norm: over the FSDP shards (DTensor), TP-split parameters summed over TP."""
        split, whole = _full_norm([p.grad for p in self.split if p.grad is not None]), _full_norm(
            [p.grad for p in self.whole if p.grad is not None])
        split = split.to(whole.device) ** 2
        if dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(split, group=self.tp_group)
        return (split + whole ** 2).sqrt()

    def step(self, lr: float) -> tuple[float, bool]:
        self.backwards_left = 1
        norm = self.grad_norm()
        stepped = math.isfinite(norm.item())
        if stepped:
            if self.grad_clip > 0:
                clip_grads_with_norm_(self.params, self.grad_clip, norm)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item(), stepped

    # -- checkpoints -------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {tp_key(ps.get_tensor_model_parallel_rank()): {
            "model": weights_only(get_model_state_dict(self.model, options=_OPTIONS)),
            "optim": get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIONS)}}

    def save(self, directory) -> None:
        """Trainable weights (LoRA: the adapters only) and optimizer state through DCP into DIRECTORY/engine:
        every rank writes its shards (every rank must call this)."""
        dcp.save(self._state(), checkpoint_id=f"{directory}/{ENGINE_DIR}")

    def load(self, directory) -> None:
        """Restore from DIRECTORY/engine, resharded onto this run's data-parallel layout."""
        path = f"{directory}/{ENGINE_DIR}"
        state = self._state()
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # DCP names missing keys; say which layout cannot be read
            raise ValueError(f"{path}: does not fit this model and tensor-parallel layout "
                             f"(TP={dist.get_world_size(self.tp_group)}): {e}") from e
        (mine,) = state.values()
        set_model_state_dict(self.model, mine["model"], options=StateDictOptions(ignore_frozen_params=True,
                                                                                  strict=False))
        set_optimizer_state_dict(self.model, self.optimizer, mine["optim"], options=_OPTIONS)
