"""Online mode: the source ranks' scores give the same training as the offline cache; placement; faults end the job
promptly with a message that names what did not arrive."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from infifpo_mcore.config import load_config
from infifpo_mcore.source_group import source_assignment
from infifpo_mcore.sources import score_sources
from tests import source_models
from tests.distributed import free_port
from tests.launcher import REPO, read_metrics, run_training

STEPS = 3


@pytest.mark.parametrize("num_sources, group_size, sharded, expected", [
    (2, 2, (), [[(0, 0, 1)], [(1, 0, 1)]]),
    (3, 2, (), [[(0, 0, 1), (2, 0, 1)], [(1, 0, 1)]]),  # fewer ranks than sources: a rank holds several
    (2, 3, (), [[(0, 0, 2)], [(1, 0, 1)], [(0, 1, 2)]]),  # more: source 0 has two replicas that split the rows
    (1, 4, (), [[(0, 0, 4)], [(0, 1, 4)], [(0, 2, 4)], [(0, 3, 4)]]),
    # a sharded source is on every rank, in index order among the others, which are placed among themselves
    (3, 2, (False, True, False), [[(0, 0, 1), (1, 0, 1)], [(1, 0, 1), (2, 0, 1)]]),
    (2, 2, (True, False), [[(0, 0, 1), (1, 0, 2)], [(0, 0, 1), (1, 1, 2)]]),
    (2, 2, (True, True), [[(0, 0, 1), (1, 0, 1)], [(0, 0, 1), (1, 0, 1)]]),
])
def test_every_source_is_placed_and_every_row_scored_once(num_sources, group_size, sharded, expected):
    placement = source_assignment(num_sources=num_sources, group_size=group_size, sharded=sharded)
    assert placement == expected
    rows = 7
    for source in range(num_sources):
        holders = [held for held in placement if any(index == source for index, _, _ in held)]
        # a sharded source's rows are all scored by each of its shards, but its table entries come from the first
        scoring = holders[:1] if source < len(sharded) and sharded[source] else holders
        covered = sorted(row for held in scoring for index, replica, replicas in held if index == source
                         for row in range(replica, rows, replicas))
        assert covered == list(range(rows))


@pytest.fixture(scope="module")
def online_setup(tmp_path_factory) -> dict:
    """16 train and 5 held-out rows, two tiny sources with different tokenizers, and the offline-scored copies."""
    root = tmp_path_factory.mktemp("online")
    sources = source_models.tiny_sources(root / "models")
    paths = {}
    for split, source_file, count in (("train", "tiny_prefs_train.jsonl", 16), ("eval", "tiny_prefs_eval.jsonl", 5)):
        raw = root / f"{split}.jsonl"
        raw.write_text("\n".join((REPO / "launch/data" / source_file).read_text().splitlines()[:count]) + "\n")
        scored = root / f"{split}_scored.jsonl"
        score_sources(load_config(overrides=[f"data.path={raw}", f"sources.output={scored}",
                                             f"sources.models={json.dumps(sources)}"]))
        paths[split], paths[f"{split}_scored"] = raw, scored
    return {"sources": sources, **paths}


def _overrides(run_dir: Path, train: Path, held_out: Path, *extra: str) -> list[str]:
    return [f"data.path={train}", f"data.eval_path={held_out}", f"run_dir={run_dir}", "loss.type=infifpo",
            "parallel.tensor=2", "parallel.pipeline=2", "model.seq_length=128", "train.micro_batch_size=1",
            "train.global_batch_size=4", f"train.steps={STEPS}", "train.warmup_steps=1", "train.lr=2e-3",
            "train.eval_interval=2", "checkpoint.save=null", *extra]


@pytest.fixture(scope="module")
def offline_metrics(online_setup, tmp_path_factory) -> list[dict]:
    """The per-step metrics of the offline run (TP 2 x PP 2 on the offline-scored data) the online runs must equal."""
    run_dir = tmp_path_factory.mktemp("offline")
    run_training(nproc=4, overrides=_overrides(run_dir, online_setup["train_scored"], online_setup["eval_scored"]))
    return read_metrics(run_dir)


@pytest.mark.distributed
@pytest.mark.parametrize("source_ranks, sharded", [
    # 3 source ranks for 2 sources: one holds the Llama source, two replicas of the Qwen one split each batch.
    (3, ()),
    # the 6-process world: the Qwen source sharded over both source ranks, two replicas of the Llama one
    (2, ("qwen",)),
])
def test_online_source_ranks_train_like_the_offline_cache(source_ranks, sharded, online_setup, offline_metrics,
                                                          tmp_path):
    sources = [dict(source, tensor_parallel=source["name"] in sharded) for source in online_setup["sources"][::-1]]
    result = run_training(nproc=4 + source_ranks, overrides=_overrides(
        tmp_path, online_setup["train"], online_setup["eval"], f"sources.num_ranks={source_ranks}",
        f"sources.models={json.dumps(sources)}", "sources.batch_tokens=256"))
    offline, online = offline_metrics, read_metrics(tmp_path)
    assert [m["step"] for m in online] == [m["step"] for m in offline] == list(range(1, STEPS + 1))
    for got, want in zip(online, offline, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margins", "grad_norm", "fusion/clip_rate_chosen"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
    for key in ("eval/loss", "eval/rewards/accuracies"):
        assert online[-1][key] == pytest.approx(offline[-1][key], rel=1e-5, abs=1e-6), key
    assert "fused from 2 source" in result.stdout
    if sharded:
        assert "source 'qwen' sharded over 2 ranks: 50.0%" in result.stderr + result.stdout


@pytest.mark.distributed
def test_online_sources_leave_out_the_rows_the_trainer_leaves_out(online_setup, offline_metrics, tmp_path):
    """Issue #16, 2: with data.skip_invalid_rows an invalid row is left out by the source ranks too (they load the
    data through the trainer's loader; they used to load it without skip_invalid and die on it, and with other
    options could score other rows, which nothing checked). The 16 valid rows then train as the offline cache."""
    train = tmp_path / "train.jsonl"
    invalid = json.dumps({"prompt": "2 + 2?", "chosen": "4", "rejected": "4"})
    train.write_text(online_setup["train"].read_text() + invalid + "\n")
    run_training(nproc=5, overrides=_overrides(
        tmp_path / "run", train, online_setup["eval"], "sources.num_ranks=1", "data.skip_invalid_rows=true",
        f"sources.models={json.dumps(online_setup['sources'])}", "sources.batch_tokens=256"))
    assert "17 rejected: identical to chosen" in (tmp_path / "run" / "skipped_rows.train.jsonl.txt").read_text()
    online = read_metrics(tmp_path / "run")
    for got, want in zip(online, offline_metrics, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm", "eval/loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)


@pytest.mark.distributed
def test_sources_slower_to_load_than_the_training_timeout_do_not_end_the_job(online_setup, tmp_path):
    """Issue #16, 3: a source that takes 50 s to load, training collectives that time out after 30 s (not less: a
    loaded 2-core box can hold one rank back for many seconds inside a step). Training rank
    0 used to wait alone for the source leader while rank 1 went on into the pivot-init scoring, and timed out
    there; every training rank now waits on the bridge (sources.timeout_minutes) until the sources are ready."""
    from tests.reliability.torchrun import WORKERS, Run

    run_dir = tmp_path / "run"
    run = Run(nproc=3, entry=WORKERS / "slow_source_load.py", log=tmp_path / "run.log",
              env={"SLOW_SOURCE_SECONDS": "50"}, overrides=_overrides(
                  run_dir, online_setup["train"], online_setup["eval"], "data.eval_path=null", "parallel.tensor=1",
                  "parallel.pipeline=1", "train.steps=2", "parallel.timeout_minutes=0.5", "sources.num_ranks=1",
                  f"sources.models={json.dumps(online_setup['sources'][:1])}"))
    assert run.finish(timeout=400) == 0, run.output[-6000:]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]


@pytest.mark.distributed
def test_a_source_rank_that_fails_ends_the_job_promptly_with_its_error(online_setup, tmp_path):
    broken = [dict(online_setup["sources"][0], path=str(tmp_path / "no-such-model")), online_setup["sources"][1]]
    started = time.monotonic()
    result = run_training(check=False, nproc=6, timeout=240, overrides=_overrides(
        tmp_path, online_setup["train"], online_setup["eval"], "sources.num_ranks=2",
        f"sources.models={json.dumps(broken)}"))
    assert result.returncode != 0
    assert "SourceError: source 'llama': " in result.stderr and "no-such-model/config.json not found" in result.stderr
    assert time.monotonic() - started < 240  # the training ranks did not wait for the dead source rank


def _silent_sources_worker(rank: int, port: int, results) -> None:
    """Rank 0 trains (alone), rank 1 is a source leader that says it is ready, takes the handshake and the grant,
    then never sends."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from infifpo_mcore import source_group
    from infifpo_mcore.parallel import join_job

    job = join_job(source_ranks=1, bridge_timeout=timedelta(seconds=3))
    try:
        if job.is_source_rank:
            job.bridge.send([torch.ones(1, dtype=torch.int64)], 0, source_group._READY).wait()
            grant = job.bridge.recv([torch.zeros(1, dtype=torch.int64)], 0, source_group._CONTROL)
            job.bridge.recv([torch.zeros(2, dtype=torch.int64)], 0, source_group._HANDSHAKE).wait()
            grant.wait()
            with pytest.raises(RuntimeError):  # no stop comes: rank 0 gave up (timed out here too, or exited)
                job.bridge.recv([torch.zeros(1, dtype=torch.int64)], 0, source_group._CONTROL).wait()
            return
        receiver = source_group.ScoreReceiver(job=job, num_sources=2, is_receiver=True, timeout=timedelta(seconds=3))
        receiver.start(consumed=0, first_step=0, end_step=1, global_batch_size=4, eval_rows=None)
        started = time.monotonic()
        try:
            receiver.next_batch(step=0)
            results.put("no error")
        except source_group.SourceGroupError as error:
            results.put(f"{time.monotonic() - started:.1f}s {error}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_scores_that_never_arrive_raise_a_clear_error_instead_of_hanging():
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_silent_sources_worker, args=(free_port(), results), nprocs=2, start_method="spawn")
    message = results.get()
    waited = float(message.split("s ", 1)[0])
    assert 2.5 < waited < 30, message
    assert "source scores of the global batch of step 0" in message and "sources.timeout_minutes" in message


@pytest.mark.distributed
def test_a_stop_signal_saves_the_training_and_the_source_ranks_keep_serving_until_told_to_stop(online_setup, tmp_path):
    """SIGTERM to every worker (what a preemption sends): the training ranks finish the step and save it; the source
    rank must not die of the signal before the trainers have taken what they were granted."""
    from tests.reliability.torchrun import Run

    root, run_dir = tmp_path / "ckpt", tmp_path / "run"
    run = Run(nproc=2, log=tmp_path / "run.log", overrides=_overrides(
        run_dir, online_setup["train"], online_setup["eval"], "parallel.tensor=1", "parallel.pipeline=1",
        "train.steps=40", "sources.num_ranks=1", f"sources.models={json.dumps(online_setup['sources'])}",
        f"checkpoint.save={root}"))
    metrics = run_dir / "metrics.jsonl"
    run.wait_until(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, timeout=240,
                   what="two steps")
    for worker in run.workers().values():
        worker.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == 0, run.output[-6000:]
    last = read_metrics(run_dir)[-1]["step"]
    assert last < 40, "the run ended before the signal arrived"
    assert (root / "latest").read_text() == f"iter_{last:07d}"
