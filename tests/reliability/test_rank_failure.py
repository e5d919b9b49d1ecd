"""Item 6: a rank that raises, or one that stops answering, brings the whole job down promptly (bounded here by
generous "did not hang" limits) with the original error in the job's output; collectives time out after
parallel.timeout_minutes."""

import pytest

from tests.reliability.conftest import overrides
from tests.reliability.torchrun import WORKERS, Run

pytestmark = pytest.mark.distributed


def test_an_exception_on_one_rank_ends_the_job_with_that_error(data, tmp_path):
    run = Run(nproc=2, entry=WORKERS / "fail_on_rank.py", log=tmp_path / "job.log",
              overrides=overrides(data, tmp_path / "run"),
              env={"FAIL_RANK": "1", "FAIL_AT_STEP": "3", "FAIL_MODE": "raise"})
    assert run.finish(timeout=180) != 0
    output = run.output
    # torchrun's summary names the failed rank and shows its traceback (the entry point is wrapped in @record)
    assert "Root Cause (first observed failure)" in output
    root_cause = output[output.index("Root Cause (first observed failure)"):]
    assert "rank      : 1" in root_cause
    assert "RuntimeError: injected failure on rank 1 at step 3" in root_cause


def test_a_rank_that_stops_answering_ends_the_job_at_the_collective_timeout(data, tmp_path):
    run = Run(nproc=2, entry=WORKERS / "fail_on_rank.py", log=tmp_path / "job.log",
              overrides=overrides(data, tmp_path / "run", "parallel.timeout_minutes=0.1"),  # 6 s
              env={"FAIL_RANK": "1", "FAIL_AT_STEP": "3", "FAIL_MODE": "hang"})
    assert run.finish(timeout=180) != 0
    output = run.output
    root_cause = output[output.index("Root Cause (first observed failure)"):]
    assert "rank      : 0" in root_cause  # the rank left waiting reports the timeout
    assert "timed out" in root_cause.lower() or "timeout" in root_cause.lower()
