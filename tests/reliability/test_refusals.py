"""Issue #20, 3: a run refused at start says why once, in rank 0's words, before torchrun's own report, with rank
0's exit code in it; also when rank 0 is the last to finish its checks (the other ranks exit quietly, so torchrun
never stops rank 0 before it has spoken). The checks themselves: tests/test_preflight.py."""

import pytest

from tests.reliability.conftest import overrides
from tests.reliability.torchrun import WORKERS, Run

pytestmark = pytest.mark.distributed


def test_a_refusal_is_said_once_by_rank_0_even_when_the_other_ranks_finish_first(data, tmp_path):
    run = Run(nproc=2, entry=WORKERS / "slow_rank0.py", log=tmp_path / "refused.log",
              overrides=overrides(data, tmp_path / "run", "loss.fusion=maxmargin"), env={"RANK0_DELAY_SECONDS": "5"})
    assert run.finish(timeout=180) != 0  # torchrun's own exit status is 1 whatever the workers' codes
    output = run.output
    assert output.count("config error: invalid config (1 problem(s)):\n  - loss.fusion: expected one of: mean, "
                        "sum, max_margin, confidence, got 'maxmargin'") == 1
    assert output.index("config error:") < output.index("Root Cause (first observed failure)")
    root_cause = output[output.index("Root Cause (first observed failure)"):]
    assert "rank      : 0" in root_cause and "exitcode  : 2" in root_cause
    assert "<NO_OTHER_FAILURES>" in output  # rank 1 agreed, and left it to rank 0 to say
    assert not (tmp_path / "run").exists()  # nothing was started
