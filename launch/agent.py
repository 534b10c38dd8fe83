"""python -m launch.agent [torchrun options] -m megatron_wan.train ...: torchrun whose stop signals reach the workers.

torchrun turns a SIGTERM or SIGUSR1 it handles into a SignalException: it forwards the signal, gives the workers
`--shutdown-timeout` seconds, kills them, and exits 1 with a traceback whatever they did. Here the stop signals
(STOP_SIGNALS) are left out of torchrun's `--signals-to-handle`; this process forwards them to its workers and
torchrun keeps waiting, so workers that save and exit 0 make the launcher exit 0, and nothing is killed before
SLURM's own time limit. The other signals (SIGINT, SIGHUP, SIGQUIT) keep torchrun's handling.

The stop signals are blocked in this process (a thread waits for them) and so in the workers it starts, which
inherit the mask: a signal that arrives while a worker imports and builds its model stays pending until the
trainer has installed its handlers and unblocks them (megatron_wan.preemption.install), instead of killing it.
SLURM signals every process of the job step, so a worker usually gets a stop signal twice; once is enough.
"""

import os
import signal
import sys
import threading
import time
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


def _forward_stop_signals() -> None:
    """Forever: wait for a (blocked) stop signal and send it to every child (once there is one)."""
    while True:
        signum = signal.sigwait(STOP_SIGNALS)
        while not (children := _children()):
            time.sleep(0.2)
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def main(argv=None) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # first, before any thread or worker exists
    threading.Thread(target=_forward_stop_signals, name="stop-signals", daemon=True).start()
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
