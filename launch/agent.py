"""python -m launch.agent [torchrun options] -m megatron_wan.train ...: torchrun whose stop signals reach the workers.

torchrun turns a SIGTERM or SIGUSR1 it handles into a SignalException: it forwards the signal, gives the workers
`--shutdown-timeout` seconds, kills them, and exits 1 with a traceback whatever they did. Here the stop signals
(STOP_SIGNALS) are left out of torchrun's `--signals-to-handle`; this process forwards them to its workers and
torchrun keeps waiting, so workers that save and exit 0 make the launcher exit 0, and nothing is killed before
SLURM's own time limit. The other signals (SIGINT, SIGHUP, SIGQUIT) keep torchrun's handling.
"""

import os
import signal
import sys
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # torchrun's own handling: forward, wait, kill, exit 1
REQUIRED_FLAGS = ("--signals-to-handle",)  # torchrun options this launcher relies on


def missing_flags(parser=None) -> list[str]:
    """The REQUIRED_FLAGS that torchrun's argument parser (the installed torch's by default) does not know."""
    if parser is None:
        from torch.distributed.run import get_args_parser

        parser = get_args_parser()
    known = {s for a in parser._actions for s in a.option_strings}
    return [f for f in REQUIRED_FLAGS if f not in known]


def check_torchrun(parser=None) -> None:
    """Raise RuntimeError naming each torchrun flag this launcher needs that the installed torch lacks."""
    missing = missing_flags(parser)
    if missing:
        import torch

        raise RuntimeError(f"torchrun of torch {torch.__version__} has no {', '.join(missing)}: "
                           f"python -m launch.agent needs a torch whose torchrun has them")


def _children() -> list[int]:
    """PIDs of this process's children (every thread's), from /proc."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _forward(signum, _frame) -> None:
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv=None) -> int:
    for s in STOP_SIGNALS:  # first: a stop signal during start-up must not end this process
        signal.signal(s, _forward)
    from torch.distributed.run import parse_args, run

    try:
        check_torchrun()
    except RuntimeError as e:
        sys.exit(f"python -m launch.agent: {e}")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.signals_to_handle = TORCHRUN_SIGNALS
    run(args)  # raises ChildFailedError (exit 1, the failures printed) when a worker fails
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
