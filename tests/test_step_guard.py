"""The bad-step guard's checks and bookkeeping (its behaviour inside a real pipeline: tests/reliability/)."""

import json
import math

import torch

from infifpo_mcore.step_guard import BadStepLog, grads_are_finite, losses_are_finite, nonfinite_rows


def output(ids, losses):
    return {"loss": torch.tensor(sum(losses) / len(losses)), "row_ids": torch.tensor(ids),
            "row_losses": torch.tensor(losses)}


def test_checks_find_nan_and_inf_and_name_the_rows():
    clean = [output([3, 1], [0.5, 0.7]), output([8, 2], [0.1, 0.2])]
    bad = [output([3, 1], [0.5, math.nan]), output([8, 2], [math.inf, 0.2])]
    assert losses_are_finite(clean) and not losses_are_finite(bad)
    assert nonfinite_rows(bad) == ([1, 8], [3, 1, 8, 2])
    layer = torch.nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    assert grads_are_finite([layer])
    layer.weight.grad[0, 1] = math.inf
    assert not grads_are_finite([layer])


def test_consecutive_bad_steps_are_counted_written_and_exhaust_the_patience(tmp_path):
    log = BadStepLog(max_consecutive=2, path=tmp_path / "skipped_steps.jsonl")
    row = {"file": "d.jsonl", "line": 4, "id": "a", "index": 3}
    log.record(step=1, bad=False)
    log.record(step=2, bad=True, reason="NaN/inf loss", rows=[row])
    log.record(step=3, bad=False)
    log.record(step=4, bad=True, reason="NaN/inf gradients", rows=[row])
    assert (log.consecutive, log.total, log.last_good_step, log.exhausted) == (1, 2, 3, False)
    log.record(step=5, bad=True, reason="NaN/inf gradients", rows=[row])
    assert log.exhausted
    lines = [json.loads(line) for line in (tmp_path / "skipped_steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5] and lines[0]["rows"] == [row]
    message = log.halt_message(step=5, checkpoint=tmp_path / "iter_0000005")
    assert "2 consecutive steps" in message and "since step 3" in message and "iter_0000005" in message
