"""Wan 2.1 DiT architecture: the config dataclass and the official presets."""

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_wan.parallel.context_parallel import CP_COMMS

ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "te")


def initialize_on_cpu(perform_initialization: bool, cuda: bool, default_device: str = "cpu") -> bool:
    """Whether megatron-core builds the parallel linears on the CPU (`use_cpu_initialization`).

    A random init always does: megatron-core's CPU path draws each full weight from torch's default generator and
    keeps this TP rank's slice, so `model.init_seed` decides the weights and TP=1 and TP=2 get the same ones, on any
    device. Its GPU path draws the local slice from the CUDA RNG tracker (seeded seed + 2718 + tp_rank), which
    ignores both. Loaded weights (nothing drawn) are allocated on the GPU directly, unless the model is being
    built on the meta device (a shell to be filled with existing tensors), which only the CPU path honours."""
    return perform_initialization or not cuda or default_device == "meta"


@dataclass
class WanConfig:
    """Architecture of a Wan 2.1 DiT plus the runtime choices that do not change its weights.

    Values of the presets are those of the official Wan2.1 configs (and diffusers' ports of them).
    """

    model_type: str = "t2v"  # "t2v" or "i2v"
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True  # RMSNorm on q and k across all heads
    cross_attn_norm: bool = True
    image_dim: int | None = None  # CLIP ViT-H/14 penultimate width (1280) for Wan 2.1 I2V; None: no image tokens
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    # Wan 2.2 TI2V: timesteps per token ([B, tokens]); image-to-video gives the first frame's tokens timestep 0
    expand_timesteps: bool = False
    # runtime (weights do not depend on these)
    attention_backend: str = "auto"
    layer_provider: str = "auto"  # "local" (megatron-core linears), "te" (Transformer Engine), "auto"
    cp_comm: str = "auto"  # self-attention across context-parallel ranks: "ring", "ulysses", "te", "auto"
    recompute: bool = False  # activation checkpointing per block
    params_dtype: torch.dtype = torch.float32
    perform_initialization: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"WanConfig.model_type: expected 't2v' or 'i2v', found {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.image_dim is not None and self.model_type != "i2v":
            raise ValueError(f"WanConfig.image_dim: CLIP image tokens are an i2v input; found model_type="
                             f"{self.model_type!r}, image_dim={self.image_dim!r}")
        if self.model_type == "i2v" and self.in_dim <= self.out_dim:
            raise ValueError(f"WanConfig.in_dim: i2v takes the condition latent (mask + first frame) on the channels, "
                             f"in_dim = out_dim + 20 (36), and Wan 2.1 I2V also the CLIP width image_dim (1280); found "
                             f"in_dim={self.in_dim}, out_dim={self.out_dim}, image_dim={self.image_dim!r}")
        if self.model_type == "t2v" and self.image_dim is not None:  # i2v: CLIP (Wan 2.1) or channels only (2.2)
            raise ValueError(f"WanConfig.image_dim: a t2v model takes no CLIP image tokens; found {self.image_dim}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"WanConfig.attention_backend: expected one of {ATTENTION_BACKENDS}, found {self.attention_backend!r}"
            )
        if self.cp_comm not in CP_COMMS:
            raise ValueError(f"WanConfig.cp_comm: expected one of {CP_COMMS}, found {self.cp_comm!r}")
        if len(self.patch_size) != 3:
            raise ValueError(f"WanConfig.patch_size: expected 3 values (t, h, w), found {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        return self.model_type == "i2v"

    @property
    def has_image_tokens(self) -> bool:
        """Whether cross-attention also reads CLIP image tokens (Wan 2.1 I2V; Wan 2.2 I2V has none)."""
        return self.image_dim is not None

    def replace(self, **overrides) -> "WanConfig":
        """A copy with `overrides`; an unknown name is an error listing the known ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown WanConfig field(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def transformer_config(self, tensor_parallel: int, context_parallel: int):
        """The megatron-core TransformerConfig the parallel layers are built with."""
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.dim,
            ffn_hidden_size=self.ffn_dim,
            num_attention_heads=self.num_heads,
            kv_channels=self.head_dim,
            layernorm_epsilon=self.eps,
            tensor_model_parallel_size=tensor_parallel,
            context_parallel_size=context_parallel,
            activation_func=functools.partial(F.gelu, approximate="tanh"),
            add_bias_linear=True,
            gated_linear_unit=False,
            bias_activation_fusion=False,
            gradient_accumulation_fusion=False,
            use_cpu_initialization=initialize_on_cpu(self.perform_initialization, torch.cuda.is_available(),
                                                     torch.get_default_device().type),
            perform_initialization=self.perform_initialization,
            init_method_std=self.init_std,
            params_dtype=self.params_dtype,
            bf16=self.params_dtype == torch.bfloat16,
            fp16=self.params_dtype == torch.float16,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )


_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

PRESETS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": dict(_14B),
    "wan2.1-i2v-14b-720p": dict(_14B, model_type="i2v", in_dim=36, image_dim=1280),
    "wan2.1-i2v-14b-480p": dict(_14B, model_type="i2v", in_dim=36, image_dim=1280),
    # tiny random configs for tests and the CPU demo (head_dim 16: RoPE split 6/4/... like the real ones)
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32),
    "tiny-i2v": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32,
                     model_type="i2v", in_dim=36, image_dim=48),
    # the procedural world's base DiT (launch.world): 32x32 clips, 8x8 latents (its VAE is 4x), 80 tokens a clip
    "world": dict(dim=64, ffn_dim=256, num_heads=4, num_layers=4, text_dim=32),
}


def preset(name: str, **overrides) -> WanConfig:
    """The named preset, with field overrides; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown Wan preset {name!r}; known presets: {', '.join(PRESETS)}")
    return WanConfig().replace(**PRESETS[name]).replace(**overrides)
