"""Test-only entry: the real training entry point, except that a source rank takes SLOW_SOURCE_SECONDS longer to load
each source model (a large source on a slow file system)."""

import os
import runpy
import time
from pathlib import Path

from infifpo_mcore import source_group

ENTRY = Path(__file__).resolve().parents[3] / "launch" / "pretrain_infifpo.py"
real_build_scorer = source_group.build_scorer


def slow_build_scorer(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_SOURCE_SECONDS"]))
    return real_build_scorer(*args, **kwargs)


if __name__ == "__main__":
    source_group.build_scorer = slow_build_scorer
    runpy.run_path(str(ENTRY), run_name="__main__")
