"""megatron_wan: Reg-DPO training of Wan 2.1 video diffusion models on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Known-harmless warnings of megatron-core, silenced once here so that every command (and every rank) is quiet:
# it falls back to torch optimizers and its own multi-tensor kernels without TE / Apex (we use neither), and
# its TransformerConfig warns about the default cuda_graph_scope "full" it sets itself.
for _message in (r"Transformer Engine and Apex are not installed", r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
