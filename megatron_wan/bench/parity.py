"""diffusers' WanTransformer3DModel as the reference of WanModel: the same random weights and matching inputs.

Used by the parity tests (tests/wan_reference.py re-exports these) and by gpu_check on a GPU.
"""

import torch

from megatron_wan.models.wan21.adapter import config_to_diffusers


def perturbed_reference(cfg, seed: int = 0):
    """diffusers' model for `cfg` with noise added to every parameter (norms and tables too), in fp32."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**config_to_diffusers(cfg)).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref.eval()


def inputs(cfg, grid=(3, 4, 6), timesteps=(3.0, 500.0, 999.0), text_len=None, seed: int = 1):
    """(x, timestep, text_emb, clip_emb) for a batch of len(timesteps) samples on a token `grid` (f, h, w).

    diffusers' I2V forward splits image tokens off a 512-long text context, so I2V text is 512 long.
    """
    g = torch.Generator().manual_seed(seed)
    b = len(timesteps)
    f, h, w = grid
    x = torch.randn(b, cfg.in_dim, f, 2 * h, 2 * w, generator=g)
    text_len = text_len or (512 if cfg.has_image_tokens else 11)
    text = torch.randn(b, text_len, cfg.text_dim, generator=g)
    clip = torch.randn(b, 257, cfg.image_dim, generator=g) if cfg.has_image_tokens else None
    return x, torch.tensor(timesteps), text, clip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
