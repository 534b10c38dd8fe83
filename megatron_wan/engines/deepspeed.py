"""The DeepSpeed engine (the comparison mode that stands in for the paper's FSDP baseline): the same model and
objectives under ZeRO-3, parameters and optimizer states offloaded to CPU (configurable). Its JSON config is
generated from ours, or taken as is from `deepspeed.config`.

DeepSpeed averages gradients over all ranks; under context parallelism the engine scales the loss by CP, as
the Megatron engine does (see megatron_wan.engines). A non-finite loss is skipped before its backward by the
trainer; gradient norms come from DeepSpeed after its step.
"""

import json
import math

import torch
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

        params = [p for p in model.parameters() if p.requires_grad]
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

    def step(self, lr: float) -> tuple[float, bool]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, math.isfinite(norm)

    def save(self, directory) -> None:
        self.model.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=True)

    def load(self, directory) -> None:
        self.model.load_checkpoint(str(directory), tag="engine", load_module_strict=False)
