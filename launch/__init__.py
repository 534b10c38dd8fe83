"""Launching megatron_wan jobs: SLURM batch scripts (`python -m launch`), local processes, and `make demo`."""
