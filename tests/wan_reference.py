"""The parity helpers of the tests: diffusers' model with every parameter perturbed, matching inputs, rel_err
(one copy, in megatron_wan.bench.parity, which gpu_check uses too)."""

from megatron_wan.bench.parity import inputs, perturbed_reference, rel_err

__all__ = ["inputs", "perturbed_reference", "rel_err"]
