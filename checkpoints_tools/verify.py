"""Run a HF model and a pivot checkpoint on the same prompts; report max |delta logit| and delta log-prob per token.

    python checkpoints_tools/verify.py --hf /models/SmolLM2-135M-Instruct --ckpt ckpt/smollm2
    torchrun --nproc_per_node 4 checkpoints_tools/verify.py --hf DIR --ckpt CKPT --tp 2 --pp 2

The pivot runs at the given TP / PP (the checkpoint reshards at load) through Megatron's pipeline schedule; HF
transformers runs on the last stage. Both in fp32. Exits 1 when max |delta logit| exceeds --tolerance.
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)

import torch.distributed as dist  # noqa: E402  (after the filter above)
from megatron.core import parallel_state  # noqa: E402

from infifpo_mcore.checkpointing import CheckpointError  # noqa: E402
from infifpo_mcore.config import ConfigError  # noqa: E402
from infifpo_mcore.parallel import destroy_parallel  # noqa: E402
from checkpoints_tools.comparison import (DEFAULT_PROMPTS, Comparison, compare, hf_logits,  # noqa: E402
                                          hf_model, megatron_logits, padded_batch, prompt_sequences)
from checkpoints_tools.conversion import load_pivot, start_process_group  # noqa: E402
from checkpoints_tools.hf_config import ConversionError  # noqa: E402


def verify(args, ctx):
    """The comparison on the rank that holds it (last stage, TP rank 0), None on the others. One prompt at a time:
    the [S, V] logits of a long prompt with a large vocabulary (Gemma's 262k) are gigabytes already."""
    chunks, card, _ = load_pivot(ckpt=args.ckpt, ctx=ctx)
    vocab = card.model.vocab_size
    prompts = Path(args.prompts).read_text(encoding="utf-8").splitlines() if args.prompts else DEFAULT_PROMPTS
    sequences, origin = prompt_sequences(hf_dir=args.hf, prompts=[p for p in prompts if p.strip()], vocab_size=vocab)
    holds_result = ctx.is_last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
    reference = hf_model(args.hf) if holds_result else None
    results = []
    for sequence in sequences:
        tokens, lengths = padded_batch([sequence])
        ours = megatron_logits(chunks, tokens=tokens, vocab_size=vocab, ctx=ctx)
        if holds_result:
            results.append(compare(reference=hf_logits(reference, tokens=tokens), ours=ours, tokens=tokens,
                                   lengths=lengths))
    if not holds_result:
        return None
    print(f"{len(sequences)} prompts, tokens from {origin}; pivot at TP {ctx.tensor} x PP {ctx.pipeline}")
    return Comparison.combine(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, type=Path, help="HF model directory")
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint root (with 'latest') or iter_* directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--prompts", help="text file, one prompt per line (default: three built-in prompts)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted max |delta logit|")
    args = parser.parse_args()
    try:
        ctx = start_process_group(tensor=args.tp, pipeline=args.pp)
        try:
            results = [None] * ctx.world_size
            dist.all_gather_object(results, verify(args, ctx))
        finally:
            destroy_parallel()
    except (ConversionError, ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    (result,) = [found for found in results if found is not None]
    ok = result.max_abs_logit_delta <= args.tolerance
    if ctx.rank == 0:
        print(f"{result.format()}: {'OK' if ok else 'FAILED'} (tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
