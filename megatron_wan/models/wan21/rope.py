"""Wan's 3D rotary position embedding over (frame, height, width).

The head dim is split as Wan does: h = w = 2 * (head_dim // 6), t = head_dim - h - w; each axis
rotates consecutive channel pairs (x[2i], x[2i+1]) by position * theta^(-2i/axis_dim).
"""

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to the (frame, height, width) axes."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None,
                 frame_offset: int = 0):
    """cos and sin of the rotation angles for every token of a (f, h, w) grid, frame-major order.

    `frame_offset` is the grid's first frame in the whole video (a context-parallel shard's).

    Returns two float32 tensors [f*h*w, 1, 1, head_dim // 2] (sequence-first, broadcast over batch and heads).
    Angles are computed in float64 like the reference implementations.
    """
    angles = []
    starts = (frame_offset, 0, 0)
    for n, start, d, shape in zip(grid, starts, axis_dims(head_dim), ((-1, 1, 1), (1, -1, 1), (1, 1, -1))):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        a = torch.arange(start, start + n, dtype=torch.float64, device=device)[:, None] * inv[None]
        angles.append(a.view(*shape, d // 2).expand(*grid, d // 2))
    a = torch.cat(angles, dim=-1).reshape(-1, 1, 1, head_dim // 2)
    return a.cos().float(), a.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [s, b, n, d] (computed in float32, returned in x's dtype)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)
