"""Diffusion-DPO for rectified flow (Eq. 2), the DPO gradient ratio DGR (Eq. 4) and Reg-DPO (Eq. 6).

    s      = Win Gap - Lose Gap = (err_w - ref_err_w) - (err_l - ref_err_l)
    L      = -log sigmoid(-beta * s) + r * err_w
    DGR    = beta * (1 - sigmoid(-beta * s))          (detached)
    dL/d err_w = DGR + r,   dL/d err_l = -DGR       (Eq. 5)

beta defaults to 500 (the paper's Table 7). Diffusion-DPO code writes the loss as
-log sigmoid(-0.5 * beta' * s): its beta' = 1000 equals our beta = 500.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BETA = 500.0
MODES = ("sft", "dpo", "regdpo")


@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # scalar, mean over pairs
    metrics: dict  # name -> float, each a mean over pairs


def sft_weight_fn(sft_weight):
    """`0` (vanilla DPO), a number (fixed r), 'dgr' (r = DGR), 'dgr*K' or 'dgr/K' -> r(dgr)."""
    if isinstance(sft_weight, (int, float)) and not isinstance(sft_weight, bool):
        if sft_weight < 0:
            raise ValueError(f"sft_weight: expected r >= 0, found {sft_weight}")
        return lambda dgr: torch.full_like(dgr, float(sft_weight))
    m = re.fullmatch(r"\s*dgr\s*(?:([*/])\s*([0-9.]+(?:e-?[0-9]+)?))?\s*", str(sft_weight).lower())
    if not m:
        raise ValueError(f"sft_weight: expected 0, a number, 'dgr', 'dgr*K' or 'dgr/K', found {sft_weight!r}")
    k = float(m.group(2)) if m.group(2) else 1.0
    if m.group(1) == "/" and k == 0:
        raise ValueError(f"sft_weight: {sft_weight!r} divides DGR by zero")
    k = 1.0 / k if m.group(1) == "/" else k
    return lambda dgr: dgr * k


def preference_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, *, beta: float = BETA,
                    sft_weight="dgr") -> PreferenceLoss:
    """Reg-DPO (Eq. 6) from per-sample errors [N]; `sft_weight=0` is vanilla Diffusion-DPO (Eq. 2).

    Stable for any s: the DPO term is a logsigmoid, DGR a sigmoid, neither overflows at beta*|s| of thousands.
    """
    dtype = torch.promote_types(model_err_w.dtype, torch.float32)  # float32 at least
    ref_err_w, ref_err_l = ref_err_w.detach().to(dtype), ref_err_l.detach().to(dtype)
    err_w, err_l = model_err_w.to(dtype), model_err_l.to(dtype)
    win_gap, lose_gap = err_w - ref_err_w, err_l - ref_err_l
    s = win_gap - lose_gap
    loss_dpo = -F.logsigmoid(-beta * s)
    dgr = (beta * torch.sigmoid(beta * s)).detach()  # = beta * (1 - sigmoid(-beta * s))
    r = sft_weight_fn(sft_weight)(dgr).detach()
    loss_sft = r * err_w
    loss = (loss_dpo + loss_sft).mean()
    per_pair = dict(dgr=dgr, r=r, dgr_plus_r=dgr + r, win_gap=win_gap, lose_gap=lose_gap, s=s, loss_dpo=loss_dpo,
                    loss_sft=loss_sft, implicit_acc=(s < 0).float(), model_err_w=err_w, model_err_l=err_l,
                    ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    metrics = {k: v.detach().mean().item() for k, v in per_pair.items()}
    metrics["loss"] = loss.item()
    return PreferenceLoss(loss, metrics)


def sft_loss(model_err_w) -> PreferenceLoss:
    """Flow-matching loss on the winners only (mode `sft`)."""
    loss = model_err_w.float().mean()
    return PreferenceLoss(loss, {"loss": loss.item(), "loss_sft": loss.item(), "model_err_w": loss.item()})
