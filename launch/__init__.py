"""Launch helpers: run megatron_wan jobs on local processes (and, later, SLURM)."""
