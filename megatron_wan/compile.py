"""Regional compilation (config `model.compile`): the forward of each Wan block compiled on its own by torch.compile.

Only the blocks are compiled, each separately, as torchtitan compiles each TransformerBlock: the blocks share one
code object and, their parameters being inputs of the traced graph, one compiled graph, so compile time does not
grow with depth. The forward method is replaced on the instance (not the module wrapped), so parameter names,
state dicts, LoRA layers and checkpoints are unchanged, and what runs around a block's forward stays eager:
activation checkpointing (`torch.utils.checkpoint` around the block, whose recompute runs the compiled forward
again), FSDP2's `fully_shard` hooks (applied after this, as torchtitan orders it) and the streamed reference's
hooks. Context-parallel attention and the TP all-reduce of the q/k norm break the graph at their collectives.

Shapes are static (`dynamic=False`): every bucket shape of a multi-resolution run compiles once, to kernels for that
shape, instead of one shape-generic graph after dynamo's automatic dynamic recompile. Grad mode (the reference's
no-grad pass), a LoRA adapter switched off and autocast are guarded too, so the first step of a shape compiles
each variant once; nothing recompiles after it. Every recompile is logged in one line with dynamo's reason
(`watch_recompiles`) and counted (`compile_stats`).
"""

import logging
import os

import torch
from torch import nn

MODES = ("default", "max-autotune-no-cudagraphs")
# per code object: compiled variants (bucket shapes x grad / no-grad x adapter on / off x autocast) kept before
# dynamo falls back to eager; torch's default (8) is two buckets of a Reg-DPO run with a no-grad reference
RECOMPILE_LIMIT = 64


class RecompileLog(logging.Filter):
    """Takes dynamo's recompile messages off their logger, each kept as one line with its reason (instead of
    torch's multi-line record on stderr); `echo(line)` is called on each."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []
        self.echo = None

    def filter(self, record: logging.LogRecord) -> bool:
        line = " ".join(record.getMessage().split())
        self.lines.append(line)
        if self.echo:
            self.echo(line)
        return False


_LOG = RecompileLog()


def watch_recompiles(echo=None) -> RecompileLog:
    """Turn on dynamo's recompile log (unless TORCH_LOGS chooses the logs, then it is left to print as asked) into
    one RecompileLog for the process; `echo`, when given, receives each recompile's line."""
    logger = torch._logging.getArtifactLogger("torch._dynamo.guards", "recompiles")
    if _LOG not in logger.filters and not os.environ.get("TORCH_LOGS"):
        torch._logging.set_logs(recompiles=True)
        logger.addFilter(_LOG)
    if echo is not None:
        _LOG.echo = echo
    return _LOG


def compile_stats() -> dict:
    """This process's compile counters: graphs compiled, recompiles logged, seconds spent compiling (forward and
    backward graphs)."""
    from torch._dynamo.utils import calculate_time_spent, counters

    return {"graphs": counters["stats"]["unique_graphs"], "recompiles": len(_LOG.lines),
            "seconds": calculate_time_spent()["total_wall_time"]}


def compile_blocks(model: nn.Module, mode: str = "default") -> nn.Module:
    """Compile the forward of every block of `model` (a WanModel) in place, with torch.compile `mode` (see MODES).
    Call it after LoRA is applied and before FSDP2's `fully_shard`. Returns `model`."""
    if mode not in MODES:
        raise ValueError(f"model.compile_mode: expected one of {list(MODES)}, found {mode!r}")
    watch_recompiles()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in model.blocks:
        if "forward" not in vars(block):  # not compiled yet
            block.forward = torch.compile(block.forward, mode=mode, dynamic=False)
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether compile_blocks compiled `model`'s blocks."""
    return all("forward" in vars(block) for block in model.blocks)
