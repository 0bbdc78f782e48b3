"""Stopping a training run cleanly on a signal: what a scheduler sends before a preemption or a
time limit (SLURM, Kubernetes: SIGTERM; ``sbatch --signal=USR1@120``: SIGUSR1) and Ctrl-C.

While the loop runs, :class:`StopSignals` catches SIGTERM, SIGUSR1 and SIGINT and only records
which one came: the step in progress, and a checkpoint being written, finish as they would.
The loop then stops at the next step boundary (under torchrun every rank at the same step,
agreed at the next log step), writes the checkpoint atomically and raises :class:`Stopped`;
the command line prints the resume command and exits with :func:`exit_status`:

    75  (EX_TEMPFAIL) stopped by SIGTERM or SIGUSR1, checkpoint written: requeue and resume
    130 (128 + SIGINT) stopped by Ctrl-C, checkpoint written
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopSignals", "Stopped", "PREEMPTED_EXIT", "INTERRUPTED_EXIT", "exit_status",
           "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPTED_EXIT = 75       # EX_TEMPFAIL of sysexits.h: a temporary failure, try again
INTERRUPTED_EXIT = 130    # the shell's 128 + SIGINT


def exit_status(signum: int) -> int:
    """The documented exit status of a run stopped by ``signum``."""
    return INTERRUPTED_EXIT if signum == signal.SIGINT else PREEMPTED_EXIT


class Stopped(Exception):
    """The run stopped on a signal after writing its checkpoint at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint "
                         f"written to {checkpoint}")

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


class StopSignals:
    """A context in which SIGTERM, SIGUSR1 and SIGINT are recorded (``received``: the first
    one's number, or None) instead of ending the process; the previous handlers come back on
    exit. Outside the main thread (where Python cannot install handlers) it records nothing
    and the signals keep their old effect."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
