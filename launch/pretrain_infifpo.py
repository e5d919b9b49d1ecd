"""Train a Megatron-Core pivot with InfiFPO (or DPO / IPO / FPO) preference optimisation.

Single machine, the tiny CPU default (TP 2 x PP 2, gloo, fp32; config launch/configs/tiny_cpu.yaml)::

    torchrun --nproc_per_node 4 launch/pretrain_infifpo.py

Your own config plus dotted overrides (data parallel = world / (tensor * pipeline))::

    torchrun --nproc_per_node 8 launch/pretrain_infifpo.py --config my.yaml parallel.tensor=2 loss.beta=0.2

Several nodes (run on every node; see launch/slurm/ for Slurm)::

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \
        launch/pretrain_infifpo.py --config my.yaml
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

# Megatron-Core warns at import, on every rank, that it falls back from Apex/TE kernels; the trainer says what
# matters (no FP8 without TE) once, itself.
warnings.filterwarnings("ignore", message=r".*Apex (is|are) not installed", category=UserWarning)
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
# Megatron's tensor-parallel layers order their gradient all-reduce against compute only with one CUDA work queue
# (Megatron-LM's launch scripts set the same); harmless on CPU.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from infifpo_mcore.checkpointing import CheckpointError  # noqa: E402  (after the filters above)
from infifpo_mcore.config import ConfigError, load_config  # noqa: E402
from infifpo_mcore.data import DataError  # noqa: E402
from infifpo_mcore.pivot_card import resolve_pivot  # noqa: E402
from infifpo_mcore.step_guard import TrainingHalted  # noqa: E402
from infifpo_mcore.trainer import train  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny_cpu.yaml"


# Expected ways for a run to refuse or stop, each found by every rank alike: said once, no traceback.
_REFUSALS = {ConfigError: ("config error", 2), DataError: ("data error", 2), CheckpointError: ("checkpoint error", 2),
             TrainingHalted: ("training halted", 3)}


@record  # any other exception: its traceback goes to torchrun's error file, which torchrun reports as the root cause
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the tiny CPU run)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 loss.type=dpo")
    args = parser.parse_args()
    try:
        # With checkpoint.load, the checkpoint's model and tokenizer apply (precedence: infifpo_mcore/pivot_card.py).
        train(resolve_pivot(load_config(path=args.config, overrides=args.overrides), overrides=args.overrides))
    except tuple(_REFUSALS) as error:
        label, code = next(value for kind, value in _REFUSALS.items() if isinstance(error, kind))
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same problem: say it once
            print(f"{label}: {error}", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
