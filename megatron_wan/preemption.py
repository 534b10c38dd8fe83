"""Stop requests (SLURM pre-emption) and the save window they leave.

SIGTERM and SIGUSR1 set a process-wide flag that the trainer reads at the end of each step: it then saves a
checkpoint and exits 0. The handlers are installed before the model is built, so a signal during start-up is a
request too. Under SLURM the signal comes `MEGATRON_WAN_SIGNAL_LEAD` seconds (the job's `--signal=USR1@LEAD`)
before the time limit: the step in flight and the save must fit in them, which `save_window_warning` checks.
"""

import math
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LEAD_ENV = "MEGATRON_WAN_SIGNAL_LEAD"  # set by launch/slurm/train.sbatch
_requested: list[str] = []  # names of the stop signals received


def _on_signal(signum, _frame) -> None:
    _requested.append(signal.Signals(signum).name)
    print(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step", file=sys.stderr, flush=True)


def install() -> dict:
    """Handle STOP_SIGNALS from now on, and unblock them (python -m launch.agent starts its workers with them
    blocked: one that came during start-up is handled now); returns the previous handlers (for `restore`)."""
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return previous


def restore(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


def requested() -> bool:
    """Whether a stop signal has arrived in this process."""
    return bool(_requested)


def signal_lead() -> float | None:
    """The lead time of the stop signal (seconds before the time limit) this job was given, if any."""
    value = os.environ.get(LEAD_ENV)
    return float(value) if value else None


def recommended_lead(step_seconds: float, save_seconds: float) -> int:
    """A lead time that fits a whole step and a save, with a quarter and 30 s to spare (seconds, rounded up)."""
    return math.ceil(1.25 * (step_seconds + save_seconds) + 30)


def save_window_warning(lead: float | None, step_seconds: float, save_seconds: float) -> str | None:
    """A warning when a signal `lead` seconds before the limit leaves less than a step plus a save, else None."""
    if lead is None or lead >= step_seconds + save_seconds:
        return None
    return (f"the stop signal comes {lead:g} s before the time limit, but a step takes {step_seconds:.1f} s and a "
            f"save {save_seconds:.1f} s: a pre-empted start may be killed before its checkpoint is written; set "
            f"signal_lead: {recommended_lead(step_seconds, save_seconds)} in the cluster settings")
