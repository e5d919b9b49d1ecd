"""Item 3: a step with NaN/inf in the loss or the gradients changes nothing, is counted and logged with its rows;
N bad steps in a row stop the run with a checkpoint of the last good state. Faults are injected in-process (NaN
reference scores for chosen rows) into a real Megatron pipeline of two stages."""

import itertools
import json
import math

import pytest
import torch

from tests.distributed import run_distributed
from tests.launcher import REPO
from tests.reliability.conftest import overrides

pytestmark = pytest.mark.distributed
TINY_CONFIG = REPO / "launch" / "configs" / "tiny_cpu.yaml"


def _parameters(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in trainer.model for p in chunk.parameters()]


def _same(first, second) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _guard_scenarios(ctx, *, data, root):
    from infifpo_mcore.config import load_config
    from infifpo_mcore.data import ResumableSampler
    from infifpo_mcore.step_guard import TrainingHalted
    from infifpo_mcore.trainer import Trainer

    cfg = load_config(path=TINY_CONFIG, overrides=overrides(
        data, root / "run", f"checkpoint.save={root / 'ckpt'}", "parallel.pipeline=2", "train.steps=8",
        "train.max_consecutive_bad_steps=2"))
    trainer = Trainer(cfg, ctx)
    if ctx.is_logging_rank:
        trainer.bad_steps.path = root / "skipped_steps.jsonl"  # fit() sets it; the first steps run by hand
    order = list(itertools.islice(iter(ResumableSampler(num_rows=24, seed=cfg.train.seed)), 8))
    poisoned = order[5]  # a row of step 2 (global batch 4)
    scores = trainer.references.tables["train"]  # the pivot-init reference, held by the last stage
    if "init_rejected_logps" in scores:
        scores["init_rejected_logps"][poisoned] = math.nan

    trainer.train_step()
    before = _parameters(trainer)
    metrics = trainer.train_step()
    assert metrics["skipped"] == 1 and metrics["skipped_steps"] == 1 and math.isnan(metrics["grad_norm"])
    assert math.isnan(metrics["loss"])
    assert _same(_parameters(trainer), before), "a bad step changed the parameters"
    assert trainer.scheduler.num_steps == 1  # the LR schedule did not move either
    if ctx.is_logging_rank:
        (record,) = [json.loads(line) for line in (root / "skipped_steps.jsonl").read_text().splitlines()]
        row = trainer.datasets["train"].rows[poisoned]
        assert record == {"step": 2, "reason": "NaN/inf loss and NaN/inf gradients",
                          "rows": [{"file": str(data), "line": poisoned + 1, "id": row.id, "index": poisoned}]}
    metrics = trainer.train_step()
    assert metrics["skipped"] == 0 and trainer.bad_steps.consecutive == 0
    good = _parameters(trainer)
    assert not _same(good, before)

    # Every row poisoned: steps 4 and 5 are bad, and two in a row stop the run after saving the last good state.
    if "init_chosen_logps" in scores:
        scores["init_chosen_logps"][:] = math.nan
    with pytest.raises(TrainingHalted, match=r"stopping at step 5: 2 consecutive steps had NaN/inf .* no update "
                                             r"was applied since step 3, .* saved at .*iter_0000005"):
        trainer.fit()
    assert _same(_parameters(trainer), good)
    assert (root / "ckpt" / "latest").read_text() == "iter_0000005"
    if ctx.is_logging_rank:
        logged = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [(m["step"], m["skipped"], m["skipped_steps"]) for m in logged] == [(4, 1.0, 2.0), (5, 1.0, 3.0)]

    # Why the guard exists: Megatron's optimizer itself applies NaN gradients (it checks only fp16 loss scaling).
    batches, _ = trainer._next_global_batch()
    trainer._forward_backward(trainer_forward_step(cfg), batches)
    trainer.optimizer.step()
    assert any(p.isnan().any() for p in _parameters(trainer))


def trainer_forward_step(cfg):
    from infifpo_mcore.train_step import training_forward_step

    return training_forward_step(cfg.loss, wrpo_alpha=0.0)  # the test trains DPO


def test_bad_steps_are_skipped_logged_and_too_many_in_a_row_stop_the_run(data, tmp_path):
    run_distributed(_guard_scenarios, world_size=2, pipeline=2, data=data, root=tmp_path)
