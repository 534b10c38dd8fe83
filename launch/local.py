"""`run_local`: a function on N local processes the way torchrun starts them (megatron_wan.parallel.local, where
the benchmarks read it too), kept under launch for the tests and scripts that start local processes."""

from megatron_wan.parallel.local import run_local

__all__ = ["run_local"]
