"""The DeepSpeed engine (the comparison mode that stands in for the paper's FSDP baseline): the same model and
objectives under ZeRO-3, parameters and optimizer states offloaded to CPU (configurable). Its JSON config is
generated from ours, or taken as is from `deepspeed.config`.

DeepSpeed averages gradients over all ranks; under context parallelism the engine scales the loss by CP, as
the Megatron engine does (see megatron_wan.engines). Before DeepSpeed steps, the engine checks every rank's
gradients (ZeRO-3: its partitions) and skips a non-finite step itself, as the Megatron engine does: DeepSpeed's
own check covers fp16 loss scaling, and depending on release and ZeRO stage a bf16 / fp32 step can be applied
(without ZeRO in fp32 it is). Gradient norms come from DeepSpeed after its step (or, where it keeps none, from
the full gradients).
"""

import json
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_wan.engines import make_optimizer


def deepspeed_config(cfg) -> dict:
    """DeepSpeed's JSON config for our run config (or the user's file when `deepspeed.config` is set)."""
    if cfg.deepspeed.config:
        with open(cfg.deepspeed.config, encoding="utf-8") as f:
            return json.load(f)
    zero = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True}
    if cfg.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.run.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # the same torch AdamW as the Megatron engine
        "bf16": {"enabled": cfg.run.dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    def __init__(self, cfg, model: torch.nn.Module):
        import deepspeed

        self.params = params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params)
        self.config = deepspeed_config(cfg)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                                optimizer=optimizer, config=self.config)
        self.module = self.model.module
        self.cp = ps.get_context_parallel_world_size()

    def begin_step(self, backwards: int) -> None:
        """One backward per step (the config allows no more: batched pairs, no accumulation)."""

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss * self.cp)

    def _gradients(self):
        """This rank's gradient of every trainable parameter: its ZeRO-3 partition, else the whole (averaged) one.
        Every rank visits every parameter: under ZeRO-1/2 the whole gradient is gathered collectively."""
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        for p in self.params:
            g = safe_get_local_grad(p) if hasattr(p, "ds_id") else safe_get_full_grad(p)
            if g is not None:
                yield g

    def _all_finite(self) -> bool:
        bad = [(~torch.isfinite(g)).any().cpu() for g in self._gradients()]
        flag = torch.stack(bad).any().float().reshape(1) if bad else torch.zeros(1)
        flag = flag.to("cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank skips together
        return not flag.item()

    def step(self, lr: float) -> tuple[float, bool]:
        if not self._all_finite():  # checked before DeepSpeed's step, which may apply it (see module doc)
            self.optimizer.zero_grad(set_to_none=True)
            return float("inf"), False
        whole = None
        if not self.model.zero_optimization():  # DeepSpeed keeps no norm; the gradients are whole and averaged
            whole = math.sqrt(sum(float(g.float().pow(2).sum()) for g in self._gradients()))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else whole, True

    def save(self, directory) -> None:
        self.model.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=True)

    def load(self, directory) -> None:
        self.model.load_checkpoint(str(directory), tag="engine", load_module_strict=False)
