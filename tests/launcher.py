"""Run the real entry point under torchrun (gloo, CPU) and read back what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "launch" / "pretrain_infifpo.py"
# The shipped default (launch/configs/tiny_cpu.yaml) trains InfiFPO on the bundled scored data; tests train DPO on
# the data they pass unless they say otherwise: these come first, a test's own overrides after them win.
BASE_OVERRIDES = ["loss.type=dpo", "loss.beta=0.1", "loss.length_norm=false", "loss.clip=true"]


def run_training(*, nproc: int, overrides: list[str], timeout: int = 300, check: bool = True,
                 base_overrides: list[str] = BASE_OVERRIDES) -> subprocess.CompletedProcess:
    """The entry point under torchrun; raises AssertionError with the output's tail if it fails and ``check``."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        str(ENTRY), *base_overrides, *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
    return result


def run_default_job(*, nproc: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """The shipped default job (launch/configs/tiny_cpu.yaml, InfiFPO) with ``overrides`` only."""
    return run_training(nproc=nproc, overrides=overrides, timeout=timeout, base_overrides=[])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
