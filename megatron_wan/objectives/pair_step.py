"""One training step's forward and backward for SFT, DPO and Reg-DPO, in three pair executions.

- `batched`: winners and losers concatenated on the batch axis, one forward, one backward.
- `sequential`: one sample at a time (lowest activation peak). The loss couples a pair only through
  two scalars, so each member is back-propagated on its own with its coefficient dL/d err; the
  loser's error is first measured without a graph, which costs one extra forward per pair.
- `ranks`: the winner on one rank, the loser on its partner (`parallel.pair_group()`); the two
  exchange only per-sample scalar errors, compute the same loss and back-propagate their own term.
  That loss is scaled by the group size, so the data-parallel *mean* of gradients equals `batched`'s.

Winner and loser share t and eps (drawn per sample id). Reference errors are computed without a graph.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_wan import parallel
from megatron_wan.objectives.flow_matching import FlowMatching, per_sample_error
from megatron_wan.objectives.preference import BETA, MODES, PreferenceLoss, preference_loss, sft_loss

PAIR_MODES = ("batched", "sequential", "ranks")


@dataclass
class Conditions:
    """What a sample is conditioned on, aligned on the batch axis. I2V: `clip` and `cond` (mask and
    first-frame latent channels, concatenated to the noisy latents)."""

    text: torch.Tensor  # [B, L, text_dim]
    clip: torch.Tensor | None = None  # [B, 257, image_dim]
    cond: torch.Tensor | None = None  # [B, C_cond, F, H, W]

    def select(self, index) -> "Conditions":
        return Conditions(*(None if t is None else t[index] for t in (self.text, self.clip, self.cond)))

    def repeat(self, k: int) -> "Conditions":
        return Conditions(*(None if t is None else torch.cat([t] * k) for t in (self.text, self.clip, self.cond)))


@dataclass
class PairBatch:
    """Normalized latents of a batch of pairs; winner and loser of pair i share sample_ids[i] and conditions."""

    win: torch.Tensor  # [B, C, F, H, W]
    lose: torch.Tensor | None  # [B, C, F, H, W]; None for SFT
    conditions: Conditions
    sample_ids: list


@dataclass
class PairObjective:
    flow: FlowMatching
    mode: str = "regdpo"
    beta: float = BETA
    sft_weight: object = "dgr"
    pair_mode: str = "batched"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, found {self.mode!r}")
        if self.pair_mode not in PAIR_MODES:
            raise ValueError(f"pair_mode: expected one of {PAIR_MODES}, found {self.pair_mode!r}")

    def backward_passes(self, pairs: int) -> int:
        """How many times `step` calls `backward` for a batch of `pairs` pairs (sequential: two per pair)."""
        return 2 * pairs if self.pair_mode == "sequential" and self.mode != "sft" else 1

    def _errors(self, net, latents, conditions: Conditions, sigma, eps):
        """Per-sample errors of `net` on `latents` noised with (sigma, eps), all aligned on the batch axis."""
        x_t, target = self.flow.noised(latents, sigma, eps)
        if conditions.cond is not None:
            x_t = torch.cat([x_t, conditions.cond.to(x_t)], dim=1)
        pred, shard = net(x_t, self.flow.model_timestep(sigma).to(x_t), conditions.text, conditions.clip,
                          gather_output=False)  # this CP rank's frames; the error is the whole video's
        return per_sample_error(pred, target, shard)

    def _loss(self, err_w, err_l, ref_w, ref_l) -> PreferenceLoss:
        sft_weight = 0 if self.mode == "dpo" else self.sft_weight  # vanilla DPO has no SFT term
        return preference_loss(err_w, err_l, ref_w, ref_l, beta=self.beta, sft_weight=sft_weight)

    def step(self, model, reference, batch: PairBatch, step: int, backward=torch.Tensor.backward) -> PreferenceLoss:
        """Forward and backward of one step (gradients accumulate into `model`); returns the loss and metrics,
        with the smallest and largest model timestep drawn (`timestep_min`, `timestep_max`).
        `backward(loss)` back-propagates (an engine's, which may scale the loss or hook its optimizer)."""
        sigma, eps = self.flow.draw(step, batch.sample_ids, batch.win.shape[1:])
        timesteps = self.flow.model_timestep(sigma)
        out = self._step(model, reference, batch, sigma.to(batch.win.device), eps.to(batch.win.device), backward)
        out.metrics.update(timestep_min=timesteps.min().item(), timestep_max=timesteps.max().item())
        return out

    def _step(self, model, reference, batch: PairBatch, sigma, eps, backward) -> PreferenceLoss:
        c = batch.conditions
        if self.mode == "sft":
            out = sft_loss(self._errors(model, batch.win, c, sigma, eps))
            backward(out.loss)
            return out
        if self.pair_mode == "ranks":
            return self._step_ranks(model, reference, batch, sigma, eps, backward)
        with torch.no_grad():
            ref_w = self._errors(reference, batch.win, c, sigma, eps)
            ref_l = self._errors(reference, batch.lose, c, sigma, eps)
        n = len(batch.sample_ids)
        if self.pair_mode == "batched":
            err = self._errors(model, torch.cat([batch.win, batch.lose]), c.repeat(2), sigma.repeat(2),
                               torch.cat([eps, eps]))
            out = self._loss(err[:n], err[n:], ref_w, ref_l)
            backward(out.loss)
            return out
        err_w, err_l = [], []
        for i in range(n):  # sequential: one sample's graph alive at a time
            at, ci = slice(i, i + 1), c.select(slice(i, i + 1))
            with torch.no_grad():
                e_l = self._errors(model, batch.lose[at], ci, sigma[at], eps[at])
            e_w = self._errors(model, batch.win[at], ci, sigma[at], eps[at])
            backward(self._loss(e_w, e_l, ref_w[at], ref_l[at]).loss / n)
            e_l = self._errors(model, batch.lose[at], ci, sigma[at], eps[at])
            backward(self._loss(e_w.detach(), e_l, ref_w[at], ref_l[at]).loss / n)
            err_w.append(e_w.detach())
            err_l.append(e_l.detach())
        return self._loss(torch.cat(err_w), torch.cat(err_l), ref_w, ref_l)

    def _step_ranks(self, model, reference, batch, sigma, eps, backward) -> PreferenceLoss:
        group = parallel.pair_group()
        role = dist.get_group_rank(group, dist.get_rank())  # 0 holds the winners, 1 the losers
        mine = batch.win if role == 0 else batch.lose
        with torch.no_grad():
            ref = self._errors(reference, mine, batch.conditions, sigma, eps)
        err = self._errors(model, mine, batch.conditions, sigma, eps)
        mine_errors = torch.stack([err.detach(), ref.to(err.dtype)])
        gathered = [torch.empty_like(mine_errors) for _ in range(2)]  # on err's device: NCCL needs that
        dist.all_gather(gathered, mine_errors, group=group)
        (w, ref_w), (lo, ref_l) = gathered
        err_w, err_l = (err, lo) if role == 0 else (w, err)
        out = self._loss(err_w, err_l, ref_w, ref_l)
        backward(out.loss * dist.get_world_size(group))
        return out

    @torch.no_grad()
    def errors(self, model, reference, batch: PairBatch, sigma, eps) -> torch.Tensor:
        """Per-pair errors without a graph, [N, 4] (model_err_w, model_err_l, ref_err_w, ref_err_l; SFT: [N, 1],
        the winners'), at the given (sigma, eps): what validation measures."""
        c = batch.conditions
        if self.mode == "sft":
            return self._errors(model, batch.win, c, sigma, eps)[:, None]
        n = len(batch.sample_ids)
        both = (torch.cat([batch.win, batch.lose]), c.repeat(2), sigma.repeat(2), torch.cat([eps, eps]))
        err, ref = self._errors(model, *both), self._errors(reference, *both)
        return torch.stack([err[:n], err[n:], ref[:n], ref[n:]], dim=1).float()

    def metrics(self, errors: torch.Tensor) -> dict:
        """The step's metrics (means over pairs) of per-pair `errors` as `errors` returns them."""
        if self.mode == "sft":
            return sft_loss(errors[:, 0]).metrics
        return self._loss(*errors.unbind(1)).metrics
