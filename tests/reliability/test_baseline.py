"""The uninterrupted reference run of the suite: it trains, and it skipped and listed the hostile rows."""

import json

from tests.reliability.conftest import HOSTILE_ROWS, STEPS, VALID_ROWS


def test_the_uninterrupted_run_trains_on_the_valid_rows_and_lists_the_skipped_ones(baseline, data):
    metrics = baseline["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["skipped"] == 0 and m["skipped_steps"] == 0 for m in metrics)
    assert len({m["loss"] for m in metrics}) == STEPS  # the parameters move
    listed = (baseline["run_dir"] / f"skipped_rows.{data.name}.txt").read_text().splitlines()
    assert len(listed) == len(HOSTILE_ROWS)
    for text, (line, (_, problem)) in zip(listed, HOSTILE_ROWS.items()):
        assert text.startswith(f"{data}:{line} {problem}"), text
    assert f"skipped {len(HOSTILE_ROWS)} invalid row(s) of {data}, kept {VALID_ROWS}" in baseline["output"]
    state = json.loads((baseline["checkpoint"] / f"iter_{STEPS:07d}" / "train_state.json").read_text())
    assert state["sampler"]["num_rows"] == VALID_ROWS
