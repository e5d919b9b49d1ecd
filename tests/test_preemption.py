"""Stop signals are recorded, not acted on, while installed; the previous handlers come back afterwards."""

import os
import signal

from infifpo_mcore.preemption import StopRequest, signal_name


def test_the_first_stop_signal_is_recorded_and_the_previous_handlers_return():
    before = signal.getsignal(signal.SIGTERM)
    request = StopRequest()
    request.install()
    try:
        assert request.signum == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # the process keeps running
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.signum == signal.SIGUSR1 and signal_name(request.signum) == "SIGUSR1"
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
