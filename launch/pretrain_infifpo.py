"""Train a Megatron-Core pivot with InfiFPO (or DPO / IPO / FPO) preference optimisation.

Single machine, the tiny CPU default (TP 2 x PP 2, gloo, fp32; config launch/configs/tiny_cpu.yaml)::

    torchrun --nproc_per_node 4 launch/pretrain_infifpo.py

Your own config plus dotted overrides (data parallel = world / (tensor * pipeline))::

    torchrun --nproc_per_node 8 launch/pretrain_infifpo.py --config my.yaml parallel.tensor=2 loss.beta=0.2

Several nodes (run on every node; see launch/slurm/ for Slurm)::

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \
        launch/pretrain_infifpo.py --config my.yaml

A run lives in its ``run_dir``: the same command again continues it from its newest checkpoint, ``--fresh`` replaces
it (infifpo_mcore/run_folder.py). The config, the layout, the run folder and the data are checked before
Megatron-Core is imported; a problem is said once, by rank 0, and ends every process (docs/configuration.md,
"When a run refuses to start"). Ctrl-C or SIGTERM during training: the step finishes and is saved, and every
process exits 0.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infifpo_mcore.preflight import RunInputs, RunPlan
    from infifpo_mcore.refusals import Refusal

# Megatron-Core warns at import, on every rank, that it falls back from Apex/TE kernels; the trainer says what
# matters (no FP8 without TE) once, itself.
warnings.filterwarnings("ignore", message=r".*Apex (is|are) not installed", category=UserWarning)
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
# torch deprecations met inside Megatron's checkpoint loading, on every rank at every resume: nothing to act on here.
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)
# Megatron's tensor-parallel layers order their gradient all-reduce against compute only with one CUDA work queue
# (Megatron-LM's launch scripts set the same); harmless on CPU.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

# Nothing heavier than the standard library at module level: Megatron's checkpoint writer starts a helper process
# that imports this file again.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny_cpu.yaml"
logger = logging.getLogger("infifpo_mcore.launch")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the tiny CPU run)")
    parser.add_argument("--fresh", action="store_true",
                        help="replace the run in run_dir (its checkpoints and metrics are deleted) instead of "
                             "continuing it")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 loss.type=dpo")
    return parser.parse_args()


def main() -> int:
    # Until the training loop takes the stop signals over (it finishes its step and saves), Ctrl-C ends a process at
    # once and without a traceback: there is nothing to save yet.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    args = _arguments()
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if rank == 0:
        logging.getLogger("infifpo_mcore").setLevel(logging.INFO)
    config = os.path.relpath(args.config) if Path(args.config).resolve().is_relative_to(Path.cwd()) else args.config
    logger.info("infifpo-mcore on %d process(es): checking %s%s, the run folder and the data", world_size, config,
                f" with {len(args.overrides)} override(s)" if args.overrides else "")

    from infifpo_mcore import preflight
    from infifpo_mcore.refusals import Refusal

    try:
        plan = preflight.plan_run(config=args.config, overrides=args.overrides, fresh=args.fresh,
                                  world_size=world_size)
        cfg = plan.cfg
        logger.info("layout: tensor %d x pipeline %d x data %d%s; loss %s", cfg.parallel.tensor,
                    cfg.parallel.pipeline, plan.data_parallel,
                    f" + {cfg.sources.num_ranks} source rank(s)" if cfg.sources.num_ranks else "", cfg.loss.type)
        logger.info("%s", plan.start.describe(steps=cfg.train.steps))
        inputs = preflight.read_inputs(cfg)
        logger.info("%s", preflight.describe_inputs(inputs, cfg))
        logger.info("starting the process groups, Megatron-Core and the pivot")
        from infifpo_mcore.pivot_card import check_stored_vocab

        check_stored_vocab(cfg)
    except Refusal as refusal:
        return _refuse(refusal, rank=rank)
    if cfg.sources.num_ranks and rank == world_size - cfg.sources.num_ranks:
        # the source leader speaks too from here on (what each source rank holds); the checks above were rank 0's
        logging.getLogger("infifpo_mcore").setLevel(logging.INFO)
    from infifpo_mcore.run_folder import resume_command
    from torch.distributed.elastic.multiprocessing.errors import record

    command = resume_command(sys.argv, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
                             world_size=world_size)
    # any other exception: its traceback goes to torchrun's error file, which torchrun reports as the root cause
    return record(_train)(plan, inputs, rank=rank, resume_command=command)


def _train(plan: RunPlan, inputs: RunInputs, *, rank: int, resume_command: str) -> int:
    from infifpo_mcore.refusals import Refusal
    from infifpo_mcore.trainer import train

    try:
        train(plan.cfg, start=plan.start, inputs=inputs, resume_command=resume_command)
    except Refusal as refusal:
        return _refuse(refusal, rank=rank)
    return 0


def _refuse(refusal: Refusal, *, rank: int) -> int:
    """Every rank finds the same problem (the same checks of the same files, or an agreed step of the loop): rank 0
    says it, without a traceback, and exits with its code. The other ranks exit 0: torchrun stops every process as
    soon as one fails, and would stop rank 0 before it has spoken."""
    if rank != 0:
        return 0
    print(f"{refusal.label}: {refusal}", file=sys.stderr, flush=True)
    return refusal.exit_code


if __name__ == "__main__":
    code = main()
    # Left is the interpreter's teardown, whose last garbage collection over torch's and Megatron's objects took
    # 4-8 s per process on 2 cores; frozen objects are not collected again (the process ends either way).
    gc.freeze()
    sys.exit(code)
