"""Evaluation as in the paper: VBench ranking points and Total_Score, GSB scores, VBench runs, training curves.

`python -m megatron_wan.eval {rank,gsb,vbench,curves} --help`.
"""

from megatron_wan.eval.gsb import gsb_score
from megatron_wan.eval.ranking import rank_methods

__all__ = ["gsb_score", "rank_methods"]
