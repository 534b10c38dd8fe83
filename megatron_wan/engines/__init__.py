"""Training engines: the same model and objectives, sharded two ways.

An engine owns the optimizer and the gradient reduction. Its contract:
- `engine.model` is what forwards go through; `engine.module` the bare WanModel.
- `engine.begin_step(n)`: the next step runs n backward passes (micro-batches x the pair mode's passes).
- `engine.backward(loss)` back-propagates this rank's loss. Under context parallelism each rank holds a share
  of a whole-video loss, so the loss is multiplied by CP and gradients averaged over DP x CP ranks: the
  result is the sum of the CP shares, averaged over data-parallel ranks.
- `engine.step(lr)` reduces, measures the global gradient norm, clips, and steps the optimizer unless the norm
  is not finite (every rank sees the same norm, so all skip together); returns (grad_norm, stepped).
- `engine.save(directory)` / `engine.load(directory)`: the trainable weights and optimizer state, every rank's part,
  written to and read from a checkpoint directory (every rank calls them; megatron_wan.checkpointing does).
"""


def make_optimizer(cfg, params):
    """AdamW over `params` with `cfg.optim`'s settings (the same in both engines)."""
    import torch

    o = cfg.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_engine(cfg, model, reference=None):
    """The engine named by `cfg.run.engine` around `model`; `reference`, a frozen copy of it (reference `copy`),
    is sharded the same way by the Megatron engine."""
    if cfg.run.engine == "deepspeed":
        from megatron_wan.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model)
    from megatron_wan.engines.megatron import MegatronEngine

    return MegatronEngine(cfg, model, reference)
