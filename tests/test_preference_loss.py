"""Reg-DPO loss, DGR and metrics against a direct transcription of the paper's equations (mpmath)."""

import itertools

import mpmath
import pytest
import torch

from megatron_wan.objectives.preference import preference_loss, sft_loss

mpmath.mp.dps = 60


def paper(err_w, err_l, ref_w, ref_l, beta, r_of_dgr):
    """Eq. 2, 4, 5, 6 written out in arbitrary precision for one pair."""
    win_gap, lose_gap = mpmath.mpf(err_w) - ref_w, mpmath.mpf(err_l) - ref_l
    s = win_gap - lose_gap
    sigma = 1 / (1 + mpmath.exp(beta * s))  # the paper's sigma(S) = 1 / (1 + e^{beta s})
    dgr = beta * (1 - sigma)  # Eq. 4
    r = r_of_dgr(dgr)
    loss_dpo = -mpmath.log(sigma)  # -log sigma(-beta s), Eq. 2
    return dict(s=s, win_gap=win_gap, lose_gap=lose_gap, dgr=dgr, r=r, dgr_plus_r=dgr + r, loss_dpo=loss_dpo,
                loss_sft=r * err_w, loss=loss_dpo + r * err_w, grad_w=dgr + r, grad_l=-dgr,
                implicit_acc=1.0 if s < 0 else 0.0)


R_SETTINGS = [(0, lambda d: 0), (25, lambda d: 25), (500, lambda d: 500), ("dgr", lambda d: d),
              ("dgr/5", lambda d: d / 5), ("dgr*2", lambda d: 2 * d), ("dgr*0.5", lambda d: d / 2)]
BETAS = [1.0, 500.0, 5000.0]
# s values chosen so beta*|s| spans 0 .. 1e4 (overflow of a naive exp at > 709)
S_VALUES = [-2.5, -0.3, -1e-3, 0.0, 4e-4, 0.01, 0.8, 3.0]


@pytest.mark.parametrize("sft_weight,r_of_dgr", R_SETTINGS)
@pytest.mark.parametrize("beta", BETAS)
def test_loss_gradients_and_metrics_match_the_equations(sft_weight, r_of_dgr, beta):
    ref_w, ref_l = 0.31, 0.47
    cases = list(itertools.product(S_VALUES, [0.2, 0.9]))  # s split between the win and the lose gap
    err_w = torch.tensor([ref_w + a * s for s, a in cases], dtype=torch.float64, requires_grad=True)
    err_l = torch.tensor([ref_l - (1 - a) * s for s, a in cases], dtype=torch.float64, requires_grad=True)
    n = len(cases)
    out = preference_loss(err_w, err_l, torch.full((n,), ref_w, dtype=torch.float64),
                          torch.full((n,), ref_l, dtype=torch.float64), beta=beta,
                          sft_weight=sft_weight)
    out.loss.backward()
    want = [paper(float(w), float(lo), ref_w, ref_l, beta, r_of_dgr) for w, lo in zip(err_w.detach(), err_l.detach())]
    assert torch.isfinite(out.loss)
    mean = {k: float(sum(p[k] for p in want) / n) for k in want[0]}
    assert out.loss.item() == pytest.approx(mean["loss"], rel=1e-5, abs=1e-6)
    for k in ("s", "win_gap", "lose_gap", "dgr", "r", "dgr_plus_r", "loss_dpo", "loss_sft", "implicit_acc"):
        assert out.metrics[k] == pytest.approx(mean[k], rel=1e-5, abs=1e-6), k
    for k, ref in (("model_err_w", err_w), ("model_err_l", err_l)):
        assert out.metrics[k] == pytest.approx(ref.mean().item(), rel=1e-6)
    assert out.metrics["ref_err_w"] == pytest.approx(ref_w) and out.metrics["ref_err_l"] == pytest.approx(ref_l)
    # Eq. 5: dL/d err_w = DGR + r, dL/d err_l = -DGR (per pair; the loss is a mean over n pairs)
    for i, p in enumerate(want):
        assert (n * err_w.grad[i]).item() == pytest.approx(float(p["grad_w"]), rel=1e-4, abs=1e-6)
        assert (n * err_l.grad[i]).item() == pytest.approx(float(p["grad_l"]), rel=1e-4, abs=1e-6)


def test_extreme_beta_s_is_finite_and_saturates():
    beta = 500.0
    s = torch.tensor([-10.0, 10.0], dtype=torch.float64)  # beta*|s| = 5000
    err_w = (0.5 + s / 2).requires_grad_()
    out = preference_loss(err_w, 0.5 - s / 2, torch.full((2,), 0.5), torch.full((2,), 0.5), beta=beta,
                          sft_weight="dgr")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(err_w.grad).all()
    # s << 0: DGR -> 0, loss_dpo -> 0; s >> 0: DGR -> beta, loss_dpo -> beta*s
    assert out.metrics["dgr"] == pytest.approx(beta / 2)
    assert out.metrics["loss_dpo"] == pytest.approx(beta * 10 / 2)


def test_r_is_detached_and_bad_weights_are_refused():
    err_w = torch.tensor([0.4], requires_grad=True)
    out = preference_loss(err_w, torch.tensor([0.6]), torch.tensor([0.5]), torch.tensor([0.5]), beta=500,
                          sft_weight="dgr")
    out.loss.backward()
    dgr = 500 * torch.sigmoid(torch.tensor(500 * -0.2)).item()
    assert err_w.grad.item() == pytest.approx(2 * dgr, rel=1e-5)  # DGR + r with r = DGR, no d(r)/d(err) term
    for bad in ("dgr+1", "half", -3, "dgr/0"):
        with pytest.raises(ValueError, match="sft_weight"):
            preference_loss(err_w, err_w, err_w, err_w, sft_weight=bad)


def test_sft_loss_is_the_winner_error():
    err = torch.tensor([0.2, 0.4])
    assert sft_loss(err).loss.item() == pytest.approx(0.3)
