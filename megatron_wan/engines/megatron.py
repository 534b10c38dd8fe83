"""The Megatron-Core engine: TP and CP inside the model (megatron-core parallel state), data parallelism by one
bucketed all-reduce of the gradients over the DP x CP group after the step's backward passes.

The reduction is explicit rather than a DDP wrapper because a pair step may run several backward passes
(`pair_mode: sequential` runs two per pair); DDP would reduce after each. The global gradient norm counts
TP-split parameters once per shard (summed over TP) and replicated ones once.
"""

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_wan.engines import make_optimizer


def engine_file(tp_rank: int) -> str:
    """The checkpoint file of one TP rank's trainable weights and optimizer state."""
    return f"engine-tp{tp_rank:02d}.pt"


class MegatronEngine:
    def __init__(self, cfg, model: torch.nn.Module):
        self.model = self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters (finetune: lora with no matching targets?)")
        self.optimizer = make_optimizer(cfg, self.params)
        self.grad_clip = cfg.optim.grad_clip
        self.cp = ps.get_context_parallel_world_size()
        self.group = ps.get_data_parallel_group(with_context_parallel=True)
        self.tp_group = ps.get_tensor_model_parallel_group()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.cp).backward()

    def _reduce(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = _flatten_dense_tensors(grads)
        size = dist.get_world_size(self.group)
        if size > 1:
            dist.all_reduce(flat, group=self.group)
            flat /= size
        for p, g in zip(self.params, _unflatten_dense_tensors(flat, grads)):
            p.grad = g

    def _grad_norm(self) -> float:
        split = sum((p.grad.float() ** 2).sum() for p in self.params if getattr(p, "tensor_model_parallel", False))
        whole = sum((p.grad.float() ** 2).sum() for p in self.params if not getattr(p, "tensor_model_parallel", False))
        split = torch.as_tensor(split, dtype=torch.float32, device=self.params[0].device)
        if dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(split, group=self.tp_group)
        return math.sqrt((split + whole).item())

    def step(self, lr: float) -> tuple[float, bool]:
        self._reduce()
        norm = self._grad_norm()
        stepped = math.isfinite(norm)
        if stepped:
            if self.grad_clip > 0 and norm > self.grad_clip:
                for p in self.params:
                    p.grad.mul_(self.grad_clip / (norm + 1e-6))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    def save(self, directory) -> None:
        """Trainable weights (LoRA: the adapters only) and optimizer state, one file per TP rank (the DP and CP
        replicas hold the same)."""
        if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
            trainable = {id(p) for p in self.params}
            weights = {k: v.detach() for k, v in self.module.named_parameters() if id(v) in trainable}
            state = {"weights": weights, "optimizer": self.optimizer.state_dict()}
            torch.save(state, f"{directory}/{engine_file(ps.get_tensor_model_parallel_rank())}")

    def load(self, directory) -> None:
        path = f"{directory}/{engine_file(ps.get_tensor_model_parallel_rank())}"
        state = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                if name not in params or params[name].shape != value.shape:
                    raise ValueError(f"{path}: weight {name} does not fit this model")
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
