"""Test-only entry: the real training entry point, except that the save of step HANG_AT_STEP stops once its
shards are written (before it is published) and waits there to be killed; HANG_MARKER tells the test when."""

import os
import runpy
import time
from pathlib import Path

ENTRY = Path(__file__).resolve().parents[3] / "launch" / "pretrain_infifpo.py"

if __name__ == "__main__":  # Megatron's checkpoint writer starts a helper process that imports this file: keep it light
    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def save_then_wait(state, directory, *args, **kwargs):
        result = real_save(state, directory, *args, **kwargs)
        if str(directory).endswith(f"iter_{int(os.environ['HANG_AT_STEP']):07d}.tmp"):
            Path(os.environ["HANG_MARKER"]).write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        return result

    dist_checkpointing.save = save_then_wait
    runpy.run_path(str(ENTRY), run_name="__main__")
