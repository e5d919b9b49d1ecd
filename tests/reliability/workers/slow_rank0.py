"""Test-only entry: the real training entry point, started RANK0_DELAY_SECONDS later on rank 0 than on the other
ranks (rank 0 the slowest to finish its checks, as a loaded node makes it)."""

import os
import runpy
import time
from pathlib import Path

ENTRY = Path(__file__).resolve().parents[3] / "launch" / "pretrain_infifpo.py"

if __name__ == "__main__":
    if os.environ["RANK"] == "0":
        time.sleep(float(os.environ["RANK0_DELAY_SECONDS"]))
    runpy.run_path(str(ENTRY), run_name="__main__")
