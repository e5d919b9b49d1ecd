"""Export a pivot checkpoint (converted, or trained at any TP / PP) as a HF model directory.

    python checkpoints_tools/mcore_to_hf.py --ckpt runs/tiny/checkpoints --out hf/tiny-trained [--dtype bfloat16]

Writes config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards and their index) and the
tokenizer files the checkpoint carries; ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it as is.
The checkpoint is resharded to TP 1 / PP 1 at load; the padded vocabulary is sliced back to the model's.
"""

import argparse
import re
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)

from infifpo_mcore.checkpointing import CheckpointError  # noqa: E402  (after the filter above)
from infifpo_mcore.config import ConfigError  # noqa: E402
from infifpo_mcore.parallel import destroy_parallel  # noqa: E402
from checkpoints_tools.conversion import export_mcore_to_hf, start_process_group  # noqa: E402
from checkpoints_tools.hf_config import ConversionError  # noqa: E402

_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def shard_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*(KB|MB|GB|)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB or 500MB, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint root (with 'latest') or iter_* directory")
    parser.add_argument("--out", required=True, type=Path, help="HF model directory to write (replaced)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype; auto: the source HF config's (float32 for a pivot made here)")
    parser.add_argument("--max-shard-size", type=shard_size, default="5GB", help="largest safetensors file")
    args = parser.parse_args()
    try:
        ctx = start_process_group()
        try:
            files = export_mcore_to_hf(ckpt=args.ckpt, out=args.out, ctx=ctx, dtype=args.dtype,
                                       max_shard_bytes=args.max_shard_size)
        finally:
            destroy_parallel()
    except (ConversionError, ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
