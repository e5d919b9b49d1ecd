"""Stop signals: a final checkpoint and a clean exit instead of a kill in the middle of a step.

Ctrl-C in a terminal sends SIGINT to torchrun, which passes it on to its workers (each in a session of its own);
Slurm warns a job before its time limit with the signal named by ``sbatch --signal`` (SIGUSR1 in
launch/slurm/infifpo.sbatch) and ends it with SIGTERM, as scancel and preemption do. torchrun passes SIGTERM and
SIGINT on to its workers, and SIGUSR1 too when ``TORCHELASTIC_SIGNALS_TO_HANDLE`` lists it (the Slurm scripts set
that); it then waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds for them before killing them.

The handler only records the signal: a step is never cut in half. The trainer all-reduces the request at every step
boundary (a signal may reach only some ranks), so every rank finishes the same step, saves it and returns. During a
save the signals are held back (``deferred``): the save completes, and the processes it starts to write its files
(Megatron's checkpoint writers) are born with them held back, so no signal kills them half-way; a signal that came
meanwhile is recorded when the save is done.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Records the first stop signal this process receives between ``install`` and ``uninstall``."""

    def __init__(self) -> None:
        self.signum = 0  # 0: none received
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Holds the stop signals back in this thread (they stay pending) and in every process started meanwhile (a
    blocked signal mask is inherited across fork and exec); pending ones are delivered on leaving."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
