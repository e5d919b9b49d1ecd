"""Shared by the reliability suite: a small dataset with hostile rows mixed in (the runs skip them with
data.skip_invalid_rows), the overrides every run uses, and one uninterrupted run the interrupted ones must match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launcher import BASE_OVERRIDES, REPO, read_metrics, run_training

STEPS = 16
VALID_ROWS = 24
# Appended after the valid rows (whose dataset indices so stay 0..23): line -> the problem the run must list.
HOSTILE_ROWS = {
    25: (json.dumps({"prompt": "2 + 2?", "chosen": "4", "rejected": "4"}), "rejected: identical to chosen"),
    26: (json.dumps({"prompt": "2 + 2?", "chosen": "4"}), "rejected: missing"),
    27: ('{"prompt": "2 + 2?", "chosen": "4", "rejected": "\\ud800"}', "rejected: not valid Unicode"),
}


@pytest.fixture(scope="package")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    rows = (REPO / "launch/data/tiny_prefs_train.jsonl").read_text().splitlines()[:VALID_ROWS]
    path.write_text("\n".join(rows + [row for row, _ in HOSTILE_ROWS.values()]) + "\n")
    return path


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The reliability runs' settings (DPO on ``data``, like every test launch: BASE_OVERRIDES), then ``extra``."""
    return [*BASE_OVERRIDES, f"data.path={data}", "data.eval_path=null", "data.skip_invalid_rows=true", f"run_dir={run_dir}",
            "model.seq_length=128", "train.micro_batch_size=2", "train.global_batch_size=4", f"train.steps={STEPS}",
            "train.warmup_steps=2", "train.lr=2e-3", "parallel.tensor=1", "parallel.pipeline=1",
            "checkpoint.save=null", *extra]


@pytest.fixture(scope="package")
def baseline(data, tmp_path_factory) -> dict:
    """The uninterrupted run at TP 1 (one process): its metrics, output and final checkpoint."""
    run_dir = tmp_path_factory.mktemp("baseline")
    result = run_training(nproc=1, overrides=overrides(data, run_dir, f"checkpoint.save={run_dir / 'ckpt'}"))
    return {"run_dir": run_dir, "metrics": read_metrics(run_dir), "output": result.stdout + result.stderr,
            "checkpoint": run_dir / "ckpt"}


def assert_bit_exact(steps: list[dict], reference: list[dict]) -> None:
    """Per-step loss, gradient norm and learning rate identical to the last bit (fp32 on CPU is deterministic)."""
    assert [m["step"] for m in steps] == [m["step"] for m in reference] == list(range(1, STEPS + 1))
    for got, want in zip(steps, reference):
        for key in ("loss", "grad_norm", "lr", "rewards/margins"):
            assert got[key] == want[key], (got["step"], key, got[key], want[key])
