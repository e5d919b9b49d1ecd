"""Convert a HF model directory into a Megatron-Core dist checkpoint that the trainer starts from.

    python checkpoints_tools/hf_to_mcore.py --hf /models/SmolLM2-135M-Instruct --out ckpt/smollm2 --tp 1 --pp 2
    torchrun --nproc_per_node 2 launch/pretrain_infifpo.py checkpoint.load=ckpt/smollm2 parallel.pipeline=2

The pivot's model config is derived from the HF config.json (an architecture or field the pivot cannot compute
exactly is refused by name); the checkpoint carries it with the tokenizer files (pivot.yaml, tokenizer/). It runs
as one process; --tp / --pp are the layout to train at: checked against the model's heads, query groups, FFN
width and layers now, and used to pad the vocabulary. dist_checkpointing loads the result at other layouts too.
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)

from infifpo_mcore.config import ConfigError  # noqa: E402  (after the filter above)
from infifpo_mcore.parallel import destroy_parallel  # noqa: E402
from checkpoints_tools.conversion import convert_hf_to_mcore, plan_conversion, start_process_group  # noqa: E402
from checkpoints_tools.hf_config import ConversionError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, type=Path, help="HF model directory (config.json, *.safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint root to write (iter_0000000, latest)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to train at (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to train at (default 1)")
    args = parser.parse_args()
    try:
        plan = plan_conversion(hf_dir=args.hf, tensor=args.tp, pipeline=args.pp)  # refusals come before any work
        ctx = start_process_group()
        try:
            path = convert_hf_to_mcore(plan=plan, out=args.out, ctx=ctx)
        finally:
            destroy_parallel()
    except (ConversionError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
