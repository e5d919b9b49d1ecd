"""Item 2: a run stopped by a wall-time signal saves the step it finished and exits cleanly; resumed, it reproduces
the uninterrupted run bit-exactly (model, optimizer, LR schedule, data position, RNG states restored). A signal
that reaches only one rank stops every rank at the same step. (Resuming into another TP/PP layout:
tests/test_trainer.py::test_tp2_pp2_equals_tp1_from_the_same_checkpoint.)"""

import random
import signal

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.launcher import REPO, read_metrics, run_training
from tests.reliability.conftest import STEPS, assert_bit_exact, overrides
from tests.reliability.torchrun import FORWARD_SIGUSR1, Run

pytestmark = pytest.mark.distributed
TINY_CONFIG = REPO / "launch" / "configs" / "tiny_cpu.yaml"  # what the entry point loads by default


def _first_step_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return lambda: path.is_file() and path.read_text().count("\n") >= 1


def test_sigusr1_to_torchrun_saves_the_finished_step_and_the_resumed_run_is_bit_exact(data, baseline, tmp_path):
    root, stopped = tmp_path / "ckpt", tmp_path / "stopped"
    run = Run(nproc=1, log=tmp_path / "stopped.log", env=FORWARD_SIGUSR1,
              overrides=overrides(data, stopped, f"checkpoint.save={root}"))
    run.wait_until(_first_step_logged(stopped), timeout=240, what="a first step")
    run.process.send_signal(signal.SIGUSR1)  # to torchrun, as Slurm's --signal does; it passes it on
    run.finish(timeout=120)
    last = read_metrics(stopped)[-1]["step"]
    assert last < STEPS, "the run ended before the signal arrived"
    assert f"SIGUSR1 received (by at least one rank): step {last} is complete; saving it and stopping" in run.output
    assert "run summary" in run.output  # the workers returned from fit
    assert (root / "latest").read_text() == f"iter_{last:07d}"

    run_training(nproc=1, overrides=overrides(data, tmp_path / "resumed", f"checkpoint.load={root}"))
    assert_bit_exact(read_metrics(stopped) + read_metrics(tmp_path / "resumed"), baseline["metrics"])


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(data, tmp_path):
    root, stopped = tmp_path / "ckpt", tmp_path / "stopped"
    run = Run(nproc=2, log=tmp_path / "stopped.log", overrides=overrides(data, stopped, f"checkpoint.save={root}"))
    run.wait_until(_first_step_logged(stopped), timeout=240, what="a first step")
    run.workers()[1].send_signal(signal.SIGTERM)  # rank 1 only; rank 0 learns of it at the step boundary
    assert run.finish(timeout=120) == 0, run.output  # a clean exit of every worker, and so of torchrun
    last = read_metrics(stopped)[-1]["step"]
    assert last < STEPS, "the run ended before the signal arrived"
    assert f"SIGTERM received (by at least one rank): step {last} is complete; saving it and stopping" in run.output
    assert (root / "latest").read_text() == f"iter_{last:07d}"
    assert sorted(path.name for path in (root / f"iter_{last:07d}" / "rng").iterdir()) == [
        "tp0_pp0_dp0.safetensors", "tp0_pp0_dp1.safetensors"]


def _rng_round_trip(ctx, *, data, root):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from infifpo_mcore.config import load_config
    from infifpo_mcore.rng import capture_rng_state
    from infifpo_mcore.trainer import Trainer

    cfg = load_config(path=TINY_CONFIG, overrides=overrides(data, root / "run", f"checkpoint.save={root / 'ckpt'}",
                                          f"parallel.tensor={ctx.tensor}"))
    trainer = Trainer(cfg, ctx)
    trainer.train_step()
    trainer._save()
    saved = capture_rng_state()
    torch.rand(3), random.random(), np.random.rand()  # every generator moves on
    with get_cuda_rng_tracker().fork():
        torch.rand(3)
    assert any(not torch.equal(saved[name], now) for name, now in capture_rng_state().items())
    trainer._load(root / "ckpt")
    restored = capture_rng_state()
    assert restored.keys() == saved.keys() and any(name.startswith("megatron/") for name in saved)
    for name in saved:
        assert torch.equal(restored[name], saved[name]), name


def test_the_checkpoint_restores_every_rng_state(data, tmp_path):
    run_distributed(_rng_round_trip, world_size=1, data=data, root=tmp_path)
