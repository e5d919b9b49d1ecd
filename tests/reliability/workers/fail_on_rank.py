"""Test-only entry: the real training entry point, except that rank FAIL_RANK, when it starts step FAIL_AT_STEP,
raises (FAIL_MODE=raise) or stops answering (FAIL_MODE=hang)."""

import os
import runpy
import signal
import time
from pathlib import Path

from infifpo_mcore.trainer import Trainer

ENTRY = Path(__file__).resolve().parents[3] / "launch" / "pretrain_infifpo.py"
real_train_step = Trainer.train_step


def failing_train_step(self):
    if self.ctx.rank == int(os.environ["FAIL_RANK"]) and self.step + 1 == int(os.environ["FAIL_AT_STEP"]):
        if os.environ["FAIL_MODE"] == "raise":
            raise RuntimeError(f"injected failure on rank {self.ctx.rank} at step {self.step + 1}")
        # Dies when torchrun stops it: one stuck inside a C call would instead be killed after torchrun's fixed
        # 30 s grace for the other workers of a failed job; the test need not wait for that.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(1)
    return real_train_step(self)


if __name__ == "__main__":
    Trainer.train_step = failing_train_step
    runpy.run_path(str(ENTRY), run_name="__main__")
