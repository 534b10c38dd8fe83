"""Process groups: torch.distributed plus megatron-core's parallel state (world = TP x CP x DP)."""

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

__all__ = [
    "all_reduce_sum", "cp_group", "cp_rank", "cp_size", "default_device", "free_port", "initialize", "is_initialized",
    "pair_group",
    "tp_group", "tp_rank", "tp_size",
]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    else:  # a plain single process: a one-rank group
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )


def initialize(tensor_parallel: int = 1, context_parallel: int = 1, *, seed: int = 1234) -> None:
    """Set up torch.distributed (gloo on CPU, nccl on CUDA) and megatron-core's TP/CP/DP groups.

    Works under torchrun (env://) and in a plain single process (a one-rank group). Calling it again
    with the same sizes is a no-op; with other sizes it is an error.
    """
    if not dist.is_initialized():
        _init_process_group()
    world = dist.get_world_size()
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size())
        if have != (tensor_parallel, context_parallel):
            raise RuntimeError(
                f"parallel state already initialized with tensor_parallel={have[0]}, "
                f"context_parallel={have[1]}; asked for {tensor_parallel}, {context_parallel}"
            )
        return
    if tensor_parallel < 1 or context_parallel < 1 or world % (tensor_parallel * context_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel x context_parallel = "
            f"{tensor_parallel} x {context_parallel}"
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, context_parallel_size=context_parallel
    )
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel as mtp

        mtp.model_parallel_cuda_manual_seed(seed)


def default_device() -> torch.device:
    """This rank's CUDA device when there is one (the one `initialize` set; before it, LOCAL_RANK's), else the CPU:
    the default wherever a model, its inputs or its collectives are placed."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def is_initialized() -> bool:
    return dist.is_initialized() and ps.model_parallel_is_initialized()


def tp_group():
    return ps.get_tensor_model_parallel_group()


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank() if is_initialized() else 0


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size() if is_initialized() else 1


def cp_group():
    return ps.get_context_parallel_group()


def cp_rank() -> int:
    return ps.get_context_parallel_rank() if is_initialized() else 0


def cp_size() -> int:
    return ps.get_context_parallel_world_size() if is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group whose every member goes on to use the sum differently: the backward sums too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce (sum): forward and backward both sum over `group`."""
    return _AllReduceSum.apply(x, group)


_PAIR_GROUP = None


def pair_group():
    """The 2-rank group that splits a preference pair (pair_mode `ranks`): consecutive members of a
    data-parallel group, i.e. ranks at the same TP/CP position. Created once, by every rank."""
    global _PAIR_GROUP
    if _PAIR_GROUP is None:
        mine = dist.get_process_group_ranks(ps.get_data_parallel_group(with_context_parallel=False))
        if len(mine) % 2:
            raise ValueError(f"pair_mode=ranks needs an even data-parallel size, found {len(mine)}")
        groups = [None] * dist.get_world_size()
        dist.all_gather_object(groups, mine)
        for dp in sorted({tuple(g) for g in groups}):
            for i in range(0, len(dp), 2):
                group = dist.new_group(list(dp[i:i + 2]))
                if dist.get_rank() in dp[i:i + 2]:
                    _PAIR_GROUP = group
    return _PAIR_GROUP
