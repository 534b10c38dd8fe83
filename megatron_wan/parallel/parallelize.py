"""Data parallelism applied from outside the model: PyTorch FSDP2 (`fully_shard`) per Wan block and on the root,
over the data-parallel x context-parallel ranks of one tensor-parallel position, composed with megatron-core TP
inside the blocks (TP-split weights are plain local tensors to FSDP, which shards them further).

`dp_shard` is the size of the groups that shard parameters, gradients and optimizer state among the DP x CP ranks
(CP ranks hold the same weights, so they shard like data-parallel ones): 1 replicates (gradients all-reduced),
-1 shards over all of them, a divisor in between is hybrid (HSDP: sharded within consecutive groups of that size,
e.g. the GPUs of a node, replicated across them). Every case is one 2-D mesh (replicate, shard) of FSDP2, so the
three share one code path: sharded parameters are DTensors with placements (Replicate(), Shard(0)).
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def shard_size(dp_shard: int, dp_cp_size: int) -> int:
    """The shard-group size of `run.dp_shard` among `dp_cp_size` data-parallel x context-parallel ranks."""
    size = dp_cp_size if dp_shard == -1 else dp_shard
    if size < 1 or dp_cp_size % size:
        raise ValueError(f"run.dp_shard: expected -1 or a divisor of the data-parallel x context-parallel size "
                         f"{dp_cp_size}, found {dp_shard}")
    return size


_MESHES: dict[int, DeviceMesh] = {}


def data_parallel_mesh(dp_shard: int) -> DeviceMesh:
    """The 2-D mesh (dp_replicate, dp_shard) over this rank's DP x CP ranks (megatron-core's data-parallel group
    with context parallelism). Built once per shard size by every rank (it creates process groups)."""
    group = ps.get_data_parallel_group(with_context_parallel=True)
    ranks = dist.get_process_group_ranks(group)
    size = shard_size(dp_shard, len(ranks))
    if size not in _MESHES:
        tp = ps.get_tensor_model_parallel_world_size()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # megatron's rank order is tp-cp-dp (TP fastest): rank = tp_rank + tp * j, j the DP x CP index
        world = init_device_mesh(device, (len(ranks) // size, size, tp), mesh_dim_names=("dp_replicate", "dp_shard",
                                                                                          "tp"))
        mesh = world["dp_replicate", "dp_shard"]
        if sorted(mesh.mesh.flatten().tolist()) != sorted(ranks):
            raise RuntimeError(f"data-parallel mesh {mesh.mesh.tolist()} does not cover megatron-core's "
                               f"data-parallel x context-parallel group {ranks} (rank order changed?)")
        _MESHES[size] = mesh
    return _MESHES[size]


def mixed_precision(dtype: str) -> MixedPrecisionPolicy:
    """bf16: compute in bf16 from fp32 master weights, gradients reduced in fp32; fp32: no casts."""
    if dtype == "bf16":
        # inputs keep their dtype: the trainer's autocast decides each op's precision, as without FSDP
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy(reduce_dtype=torch.float32)


def parallelize(model: nn.Module, mesh: DeviceMesh, *, dtype: str = "fp32", reshard_after_forward: bool = True
                ) -> nn.Module:
    """FSDP2 on every block of `model` (a WanModel) and on its root, over `mesh` (see data_parallel_mesh).
    Frozen parameters (a LoRA base, a reference copy) are sharded like trainable ones. Returns `model`, now an
    FSDPModule."""
    policy = dict(mesh=mesh, mp_policy=mixed_precision(dtype))
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **policy)
    # the root's own parameters (embeddings, head) are needed first in backward: kept gathered, as torchtitan does
    fully_shard(model, reshard_after_forward=False, **policy)
    return model


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (the local shard of a DTensor, else the whole tensor)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def compute_parameters(model: nn.Module) -> list:
    """What `model`'s forward computes with under FSDP2: the local shards of its DTensor parameters and the
    unsharded parameters FSDP2 gathers them into (which exist after a first forward), e.g. to tell weights from
    activations among the tensors autograd saves."""
    from torch.distributed.fsdp import FSDPModule

    out = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group  # FSDP2 keeps no public handle on these
            for param in group.fsdp_params if group else ():
                if hasattr(param, "_unsharded_param"):
                    out.append(param._unsharded_param)
    return out
