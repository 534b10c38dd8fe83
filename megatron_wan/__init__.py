"""megatron_wan: Reg-DPO training of Wan 2.1 video diffusion models on Megatron-Core."""

import re
import warnings

__version__ = "0.1.0"

# The oldest torch with every API used here: torch._dynamo.config.recompile_limit (2.7; cache_size_limit before, whose
# rename missed 2.6), and since 2.6 torch.distributed.fsdp.fully_shard / MixedPrecisionPolicy (before: the private
# torch.distributed._composable.fsdp) and torch.nn.utils.get_total_norm / clip_grads_with_norm_. setup.py reads it.
MIN_TORCH = "2.7"


def torch_version_problem(version: str) -> str | None:
    """Why torch `version` (torch.__version__, e.g. "2.6.0+cu124", an NGC "2.7.0a0+...") cannot run this project,
    naming the minimum; None when it can. Pre-releases count as their release (NGC containers ship them)."""
    found = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", version).groups())
    if found >= tuple(int(n) for n in MIN_TORCH.split(".")):
        return None
    return (f"megatron_wan needs torch >= {MIN_TORCH} (torch._dynamo.config.recompile_limit, fully_shard, "
            f"get_total_norm); this is torch {version}: pip install 'torch>={MIN_TORCH}'")

# Known-harmless warnings of megatron-core, silenced once here so that every command (and every rank) is quiet:
# it falls back to torch optimizers and its own multi-tensor kernels without TE / Apex (we use neither), and
# its TransformerConfig warns about the default cuda_graph_scope "full" it sets itself.
for _message in (r"Transformer Engine and Apex are not installed", r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
