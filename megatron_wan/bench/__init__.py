"""Benchmarks: each prints ratios measured in one run (machines are noisy)."""
