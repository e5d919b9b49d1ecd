"""Start the real entry point (or a test-only worker script around it) under torchrun as a process the test can
signal, wait on with a "did not hang" bound, and read the output of."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.distributed import free_port
from tests.launcher import BASE_OVERRIDES, ENTRY, REPO

WORKERS = Path(__file__).resolve().parent / "workers"
# What launch/slurm/common.sh exports: torchrun (its --signals-to-handle) passes SIGUSR1 on to its workers as well.
FORWARD_SIGUSR1 = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}


class Run:
    def __init__(self, *, nproc: int, overrides: list[str], log: Path, entry: Path = ENTRY,
                 env: dict[str, str] | None = None):
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", str(entry), *BASE_OVERRIDES, *overrides]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                       **(env or {})}
        with log.open("w") as file:
            self.process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=file,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> dict[int, psutil.Process]:
        """Global rank -> worker process (torchrun's children)."""
        children = psutil.Process(self.process.pid).children()
        return {int(child.environ()["RANK"]): child for child in children}

    def wait_until(self, condition: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended ({self.process.returncode}) before {what}:\n{self.output[-6000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} within {timeout} s:\n{self.output[-6000:]}")
            time.sleep(0.05)

    def finish(self, *, timeout: float) -> int:
        """The exit code; a run still alive after ``timeout`` seconds is killed and the test fails (a hang)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"hung: still running after {timeout} s:\n{self.output[-6000:]}") from None

    def kill(self) -> None:
        for process in [*psutil.Process(self.process.pid).children(recursive=True), self.process]:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
