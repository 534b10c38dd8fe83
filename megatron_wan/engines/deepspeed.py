"""The DeepSpeed engine (the comparison mode that stands in for the paper's FSDP baseline): the same model and
objectives under ZeRO-3, parameters and optimizer states offloaded to CPU (configurable). Its JSON config is
generated from ours, or taken as is from `deepspeed.config`.

DeepSpeed averages gradients over all ranks, in fp32 as the Megatron engine reduces them
(`communication_data_type`; DeepSpeed's default is the bf16 of the parameters); under context parallelism the
engine scales the loss by CP, as the Megatron engine does (see megatron_wan.engines). A step whose gradients are not
finite is skipped on every rank, as the Megatron engine does: by DeepSpeed itself where its step does so in every
dtype (`deepspeed_checks_gradients`: ZeRO-3), so the engine reads no gradient (under optimizer offload they are
CPU partitions, each a copy to the GPU to look at); elsewhere the engine checks every rank's gradients before
DeepSpeed steps (DeepSpeed's own check may cover only fp16 loss scaling there; without ZeRO in fp32 it applies the
step). Gradient norms come from DeepSpeed after its step (or, where it keeps none, from the full gradients).
"""

import json
import math
import re

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
        "communication_data_type": "fp32",  # gradients reduced in fp32, as the Megatron engine's FSDP2 does
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def deepspeed_checks_gradients(config: dict, version: str) -> bool:
    """Whether DeepSpeed `version`'s own step skips a step whose gradients are not finite, in every dtype, under
    `config`: ZeRO-3 from 0.19.8, the release read (runtime/zero/stage3.py, `step`: a non-finite global norm is an
    overflow, the step is skipped and the gradients cleared; the norm comes from what it computes while reducing,
    under optimizer offload each parameter's norm on the device, all-reduced, so every rank agrees). Earlier
    releases check only fp16 loss scaling there; other stages differ by dtype and settings: the engine checks."""
    release = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)\.(\d+)", version).groups())
    return config.get("zero_optimization", {}).get("stage", 0) == 3 and release >= (0, 19, 8)


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
        self.checked_by_deepspeed = deepspeed_checks_gradients(self.config, deepspeed.__version__)

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
        if not self.checked_by_deepspeed and not self._all_finite():  # before a step DeepSpeed may apply
            self.optimizer.zero_grad(set_to_none=True)
            return float("inf"), False
        whole = None
        if not self.model.zero_optimization():  # DeepSpeed keeps no norm; the gradients are whole and averaged
            whole = math.sqrt(sum(float(g.float().pow(2).sum()) for g in self._gradients()))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.step()
        if not self.model.was_step_applied():  # DeepSpeed's own check skipped it (on every rank)
            return float("inf"), False
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else whole, True

    def save(self, directory) -> None:
        self.model.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=True)

    def load(self, directory) -> None:
        self.model.load_checkpoint(str(directory), tag="engine", load_module_strict=False)
