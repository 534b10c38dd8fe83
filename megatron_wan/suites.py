"""The suites of `python -m megatron_wan.bench`, by name: read by that entry point and by launch (which submits
them as SLURM jobs), so that neither imports the other."""

SUITES = ("sweep", "mfu", "compile_time", "plan", "fsdp_memory", "activation_memory", "pair_modes", "shard_read",
          "loader", "stability", "gpu_check")
