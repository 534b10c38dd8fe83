"""WanModel: the Wan 2.1 DiT (T2V and I2V) built from megatron-core parts.

Public forward takes and returns diffusers' layout [B, C, F, H, W]; inside, tokens are
sequence-first [s, b, dim] as in Megatron.
"""

import math
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_wan import parallel
from megatron_wan.models.wan21.config import WanConfig
from megatron_wan.models.wan21.embeddings import Head, ImageEmbedding, TimeEmbedding, TwoLayerMLP
from megatron_wan.models.wan21.rope import rope_cos_sin
from megatron_wan.models.wan21.specs import block_spec
from megatron_wan.parallel.context_parallel import FrameShard, gather_tokens, replicated, scatter_frames


class WanModel(MegatronModule):
    """Wan 2.1 DiT with tensor-parallel blocks; `model(x, timestep, text_emb, clip_emb=None)`. Built under the
    TP/CP groups its entry point set up (megatron_wan.parallel.initialize)."""

    def __init__(self, config: WanConfig):
        if not parallel.is_initialized():
            raise RuntimeError("WanModel: no process groups; the entry point calls megatron_wan.parallel.initialize("
                               "tensor_parallel, context_parallel) before building a model (the model reads them)")
        tconfig = config.transformer_config(parallel.tp_size(), parallel.cp_size())
        super().__init__(tconfig)
        self.wan = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.time = TimeEmbedding(config.freq_dim, dim)
        self.text_embedding = TwoLayerMLP(config.text_dim, dim, dim, partial(F.gelu, approximate="tanh"))
        self.image_embedding = ImageEmbedding(config.image_dim, dim) if config.has_image_tokens else None
        spec = block_spec(config.layer_provider)
        self.blocks = nn.ModuleList(build_module(spec, config=tconfig, wan=config) for _ in range(config.num_layers))
        self.head = Head(dim, config.out_dim * math.prod(config.patch_size), config.eps)
        if tconfig.params_dtype != torch.float32:
            self.to(tconfig.params_dtype)

    # -- pieces of the forward -------------------------------------------------------------------

    def token_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """The token grid (f, h, w) of latents x [B, C_in, F, H, W], which must divide by the patch."""
        cfg = self.wan
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"WanModel input: expected [B, {cfg.in_dim}, F, H, W], found {list(x.shape)}")
        if any(n % p for n, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(
                f"WanModel input: latent size {list(x.shape[2:])} is not divisible by patch {cfg.patch_size}"
            )
        return tuple(n // p for n, p in zip(x.shape[2:], cfg.patch_size))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, F, H, W] -> tokens [s, B, dim], frame-major."""
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        return tokens.flatten(2).permute(2, 0, 1).contiguous()

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head output [s, B, p_t*p_h*p_w*C_out] -> [B, C_out, F, H, W]."""
        (f, h, w), (pt, ph, pw) = grid, self.wan.patch_size
        x = tokens.transpose(0, 1).reshape(-1, f, h, w, pt, ph, pw, self.wan.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(-1, self.wan.out_dim, f * pt, h * ph, w * pw)

    def timestep_tokens(self, timestep, batch: int, shard: FrameShard) -> torch.Tensor:
        """Timesteps sequence-first for the shard's tokens: [1, B] for one per sample (a number, [1] or [B]),
        [s_local, B] for one per token ([B, f*h*w] of the whole video, frame-major as the tokens; Wan 2.2 TI2V)."""
        if timestep.ndim == 2:
            tokens = math.prod(shard.grid)
            if tuple(timestep.shape) != (batch, tokens):
                raise ValueError(f"WanModel timestep: per token expects [B, f*h*w] = [{batch}, {tokens}], "
                                 f"found {list(timestep.shape)}")
            return shard.local_tokens(timestep).transpose(0, 1)
        if timestep.ndim > 2 or timestep.numel() not in (1, batch):
            raise ValueError(f"WanModel timestep: expected a number, [{batch}] or [{batch}, tokens], "
                             f"found {list(timestep.shape)}")
        return timestep.reshape(1, -1).expand(1, batch)

    def conditions(self, timestep, text_emb, clip_emb=None):
        """Embeddings of the conditions from timesteps [n, B] (`timestep_tokens`): (temb [n, B, dim],
        t_mod [n, B, 6, dim], text context [L, B, dim], image context or None)."""
        cfg = self.wan
        if text_emb.ndim != 3 or text_emb.shape[-1] != cfg.text_dim:
            raise ValueError(f"WanModel text_emb: expected [B, L, {cfg.text_dim}], found {list(text_emb.shape)}")
        if cfg.has_image_tokens and (clip_emb is None or clip_emb.shape[-1] != cfg.image_dim):
            found = None if clip_emb is None else list(clip_emb.shape)
            raise ValueError(f"WanModel clip_emb: I2V expects [B, 257, {cfg.image_dim}], found {found}")
        if not cfg.has_image_tokens and clip_emb is not None:
            raise ValueError("WanModel clip_emb: this is a T2V model; it takes no CLIP image tokens")
        dtype = self.text_embedding.linear_1.weight.dtype
        temb, t_mod = self.time(timestep)
        # contiguous: with several samples a transposed [L, B, dim] is not foldable to 2D, and torch.matmul inside
        # megatron-core's linear then runs a batched matmul over a weight expanded L times
        context = self.text_embedding(text_emb.to(dtype)).transpose(0, 1).contiguous()
        image = self.image_embedding(clip_emb.to(dtype)).transpose(0, 1).contiguous() if cfg.has_image_tokens else None
        return temb, t_mod, context, image

    def run_blocks(self, tokens, context, image, t_mod, rope, shard=None):
        """Tokens [s, B, dim] through every block (activation checkpointing per block when configured)."""
        for block in self.blocks:
            if self.wan.recompute and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, context, image, t_mod, rope, shard, use_reentrant=False)
            else:
                tokens = block(tokens, context, image, t_mod, rope, shard)
        return tokens

    def forward(self, x, timestep, text_emb, clip_emb=None, *, gather_output: bool = True,
                shard: FrameShard | None = None):
        """x [B, C_in, F, H, W] (I2V: conditioning channels already concatenated), timestep [B] or per token
        [B, f*h*w] (the whole video's tokens, also under CP), text_emb [B, L, text_dim] (used at the length given),
        clip_emb [B, 257, image_dim] -> [B, C_out, F, H, W].

        Under context parallelism every rank passes the whole input; the video is sharded along frames
        inside. `gather_output=True` returns the whole prediction on every rank, and every rank gets the
        complete gradient of its inputs (replicated tensors, see parallel.context_parallel); `False` returns (this
        rank's frames of it [B, C_out, k*p_t, H, W], tail padding included, and its FrameShard): the training path,
        whose loss is computed on the local shard. Given a `shard`, x is already that shard's frames
        (`shard.local_latents` of the whole input), as a sampler holds them through its loop.
        """
        timestep = torch.as_tensor(timestep, device=x.device)
        if shard is None:
            shard = FrameShard.current(self.token_grid(x), self.wan.patch_size[0])
            if gather_output:  # replicated inputs and output: every rank gets the complete input gradients
                x = scatter_frames(x, shard)
                timestep, text_emb, clip_emb = (replicated(t, shard) for t in (timestep, text_emb, clip_emb))
            else:
                x = shard.local_latents(x)
        elif self.token_grid(x) != shard.local_grid:
            raise ValueError(f"WanModel input: a shard of token grid {list(shard.local_grid)} was given, "
                             f"the input's is {list(self.token_grid(x))}")
        tokens = self.patchify(x)
        timestep = self.timestep_tokens(timestep, x.shape[0], shard)
        temb, t_mod, context, image = self.conditions(timestep, text_emb, clip_emb)
        rope = rope_cos_sin(shard.local_grid, self.wan.head_dim, self.wan.rope_theta, device=x.device,
                            frame_offset=shard.first_frame)
        tokens = self.head(self.run_blocks(tokens, context, image, t_mod, rope, shard), temb)
        if gather_output:
            return self.unpatchify(gather_tokens(tokens, shard), shard.grid)
        return self.unpatchify(tokens, shard.local_grid), shard

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, source, **overrides) -> "WanModel":
        """Build from a diffusers WanTransformer3DModel, its state dict, or its `transformer/` folder.

        The config comes from the model's (or folder's) config; a bare state dict infers it from the
        weight shapes (pass `num_heads=` when the head dim is not Wan's 128). Each TP rank reads only
        its slice of the split weights.
        """
        from megatron_wan.models.wan21 import adapter

        return adapter.load(cls, source, "diffusers", overrides)

    @classmethod
    def from_original(cls, source, **overrides) -> "WanModel":
        """Build from an original Wan-AI checkpoint (folder with config.json, or a state dict)."""
        from megatron_wan.models.wan21 import adapter

        return adapter.load(cls, source, "original", overrides)
