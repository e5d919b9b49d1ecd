"""Item 2: a run stopped by a wall-time signal saves the step it finished and exits cleanly; resumed, it reproduces
the uninterrupted run bit-exactly (model, optimizer, LR schedule, data position, RNG states restored). A signal
that reaches only one rank stops every rank at the same step. (Resuming into another TP/PP layout:
tests/test_trainer.py::test_tp2_pp2_equals_tp1_from_the_same_checkpoint.)"""

import os
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


def _first_step_logged(run_dir, steps: int = 1):
    path = run_dir / "metrics.jsonl"
    return lambda: path.is_file() and path.read_text().count("\n") >= steps


def test_ctrl_c_saves_the_step_and_the_same_command_continues_it_bit_exact(data, baseline, tmp_path):
    """Issue #20, 1, 2 and 6: Ctrl-C (SIGINT to torchrun's process group, as a terminal sends it) during training,
    after a periodic save has started Megatron's checkpoint-writer helper: the step finishes and is saved, the
    summary says how to resume, no worker prints a traceback or has to be killed. The same command again continues
    in its run folder, saying so first, and every step is logged once, bit-exact with the uninterrupted run."""
    run_dir = tmp_path / "run"
    command = overrides(data, run_dir, "checkpoint.save=${run_dir}/checkpoints", "checkpoint.save_interval=2")
    run = Run(nproc=1, log=tmp_path / "stopped.log", overrides=command)
    run.wait_until(_first_step_logged(run_dir, steps=3), timeout=240, what="step 3 (after the save of step 2)")
    os.killpg(run.process.pid, signal.SIGINT)
    run.finish(timeout=120)
    output, last = run.output, read_metrics(run_dir)[-1]["step"]
    assert 3 <= last < STEPS, "the run ended before the signal arrived"
    assert output.lstrip().startswith("[") and "infifpo-mcore on 1 process(es): checking" in output.split("\n")[0]
    assert f"run_dir {run_dir}: a new run" in output and "data: 24 training pairs" in output
    assert f"training steps 1-{STEPS} of {STEPS}: 4 pairs per step" in output
    assert f"step 1/{STEPS}: loss " in output and f"step 2: saved {run_dir}/checkpoints/iter_0000002 (" in output
    assert f"SIGINT received (by at least one rank): step {last} is complete; saving it and stopping" in output
    assert f"step {last}: saved {run_dir}/checkpoints/iter_{last:07d} (" in output
    summary = output[output.index(f"run summary (stopped: SIGINT after step {last} of {STEPS})"):]
    assert f"resume:          the same command again (run_dir {run_dir} continues from step {last}):" in summary
    assert "launch/pretrain_infifpo.py" in summary.split("resume:")[1].splitlines()[1]
    assert "KeyboardInterrupt" not in output and "[rank0]:" not in output and "BrokenPipeError" not in output
    assert "forcefully exiting via SIGKILL" not in output  # torchrun did not have to kill the worker

    resumed = run_training(nproc=1, overrides=command)
    assert f"run_dir {run_dir}: resuming its run from step {last} of {STEPS}" in resumed.stderr
    assert f"training steps {last + 1}-{STEPS} of {STEPS}" in resumed.stderr
    assert_bit_exact(read_metrics(run_dir), baseline["metrics"])  # steps 1..16, each once


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
