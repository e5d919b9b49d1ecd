"""Item 1: a process killed with SIGKILL in the middle of a save leaves the previous checkpoint published and
loadable; the next start removes the half-written one, resumes exactly, and keeps only the last K checkpoints."""

import os
import signal

import pytest

from infifpo_mcore.checkpointing import CheckpointError, resolve_checkpoint
from tests.launcher import read_metrics, run_training
from tests.reliability.conftest import assert_bit_exact, overrides
from tests.reliability.torchrun import WORKERS, Run

pytestmark = pytest.mark.distributed


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_the_restart_cleans_up(data, baseline, tmp_path):
    root, marker = tmp_path / "ckpt", tmp_path / "saving"
    run = Run(nproc=1, entry=WORKERS / "hang_in_save.py", log=tmp_path / "killed.log",
              overrides=overrides(data, tmp_path / "killed", f"checkpoint.save={root}", "checkpoint.save_interval=2"),
              env={"HANG_AT_STEP": "4", "HANG_MARKER": str(marker)})
    run.wait_until(marker.exists, timeout=240, what="the save of step 4")
    # The worker, inside save_checkpoint, with the helper processes it started (its process group, as when its node
    # fails): killing the worker alone would leave Megatron's checkpoint-writer helper running after the test.
    os.killpg(os.getpgid(int(marker.read_text())), signal.SIGKILL)
    assert run.finish(timeout=60) != 0
    assert "Signal 9 (SIGKILL)" in run.output

    # The step-4 save wrote its shards but was never published: `latest` still names step 2.
    assert (root / "latest").read_text() == "iter_0000002"
    assert (root / "iter_0000004.tmp" / ".metadata").is_file()
    assert resolve_checkpoint(root) == root / "iter_0000002"
    with pytest.raises(CheckpointError, match="unfinished save"):
        resolve_checkpoint(root / "iter_0000004.tmp")

    resumed = run_training(nproc=1, overrides=overrides(
        data, tmp_path / "resumed", f"checkpoint.load={root}", f"checkpoint.save={root}",
        "checkpoint.save_interval=8", "checkpoint.keep_last=2"))
    assert f"removed {root / 'iter_0000004.tmp'}: a save interrupted before it was published" in resumed.stderr
    assert sorted(path.name for path in root.iterdir()) == ["iter_0000008", "iter_0000016", "latest"]
    assert (root / "latest").read_text() == "iter_0000016"
    killed = [m for m in read_metrics(tmp_path / "killed") if m["step"] <= 2]
    assert_bit_exact(killed + read_metrics(tmp_path / "resumed"), baseline["metrics"])
