"""source_scoring: forward-only scoring throughput of a source model per precision, and how far each precision's
per-token response log-probs are from the first (highest) precision's: mean and max |delta log-prob| in nats.

Each precision is the product's scorer (``prepare_source`` + ``build_scorer`` -> ``SourceScorer.score``: own
tokenizer, length-sorted batches of ``--batch-tokens`` padded tokens, output head on the response positions only),
timed on the same rows, the precisions alternating over ``--repeats`` (median). Tokens/s counts prompt + response
tokens. The accuracy pass scores the same batches with ``SourceScorer.response_token_logps`` under each precision and
compares the response tokens. Goal (issue #8, GPU): fp8 >= 1.7x bf16 at <= 0.02 nat mean.

The default source is a randomly initialised Llama of ``--model``'s shape with the Mistral sentencepiece tokenizer: a
throughput figure. Its near-uniform predictions make the log-prob deltas unlike a trained model's; pass
``--model-path`` (a HF model directory with its tokenizer.json) for accuracy figures that mean something.

  CPU proof run (fp32 reference vs bf16):  python -m benchmarks.source_scoring
  H100 (bf16 reference vs fp8, needs TE):  python -m benchmarks.source_scoring --model llama-3b --precision bf16 fp8 \
                                               --rows 256 --prompt-words 256 --response-words 512 --batch-tokens 16384
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks import common
from infifpo_mcore.config import SourceConfig, SourceTokenizerConfig, TokenizerType
from infifpo_mcore.data import read_preference_rows
from infifpo_mcore.parallel import local_device
from infifpo_mcore.sources import SourceScorer, build_scorer, prepare_source


def _source_config(args: argparse.Namespace, *, model_dir: Path, precision: str) -> SourceConfig:
    if args.model_path:
        tokenizer = SourceTokenizerConfig()  # the model directory's own tokenizer.json and chat template
    else:
        tokenizer = SourceTokenizerConfig(type=TokenizerType(common.SOURCE_TOKENIZER["type"]),
                                          path=common.SOURCE_TOKENIZER["path"],
                                          chat_template=common.SOURCE_TOKENIZER["chat_template"])
    return SourceConfig(name=f"source-{precision}", path=str(model_dir), tokenizer=tokenizer, precision=precision)


def _timed_score(scorer: SourceScorer, rows) -> float:
    common.synchronize()
    start = time.perf_counter()
    scorer.score(rows)
    common.synchronize()
    return time.perf_counter() - start


def _token_deltas(reference: SourceScorer, other: SourceScorer, sequences) -> torch.Tensor:
    """|delta log-prob| of every response token, the reference's length-sorted batches under both scorers."""
    deltas = []
    for indices in reference.batches(sequences):
        chunk = [sequences[index] for index in indices]
        want, mask = reference.response_token_logps(chunk)
        got, _ = other.response_token_logps(chunk)
        deltas.append((got - want).abs()[mask].cpu())
    return torch.cat(deltas)


def measure(args: argparse.Namespace) -> dict:
    args.workdir.mkdir(parents=True, exist_ok=True)
    device = local_device()
    data = common.write_preference_data(args.workdir / "rows.jsonl", rows=args.rows, prompt_words=args.prompt_words,
                                        response_words=args.response_words)
    rows = read_preference_rows(data)
    model_dir = args.model_path or args.workdir / f"random-{args.model}"
    if not args.model_path and not (model_dir / "config.json").is_file():
        common.save_random_hf_model(common.SHAPES[args.model], model_dir,
                                    max_positions=2 * (args.prompt_words + args.response_words) + 64)
    scorers = {}
    for precision in args.precision:
        prepared = prepare_source(_source_config(args, model_dir=model_dir, precision=precision), device=device,
                                  workdir=args.workdir / "tokenizers" / precision)
        scorers[precision] = build_scorer(prepared, device=device, batch_tokens=args.batch_tokens)
    reference = scorers[args.precision[0]]
    sequences = reference.encode(rows)
    tokens = sum(len(ids) for ids, _ in sequences)
    response_tokens = sum(length for _, length in sequences)
    for scorer in scorers.values():  # warm-up: kernels, allocator, TE's FP8 scaling state
        scorer.score(rows[: max(1, len(rows) // 8)])
    seconds = {precision: [] for precision in scorers}
    for _ in range(args.repeats):
        for precision, scorer in scorers.items():
            seconds[precision].append(_timed_score(scorer, rows))
    results = []
    for precision, scorer in scorers.items():
        median = statistics.median(seconds[precision])
        result = {"precision": precision, "seconds": median, "tokens_per_sec": tokens / median}
        if scorer is not reference:
            deltas = _token_deltas(reference, scorer, sequences)
            result.update(mean_abs_delta_logp=deltas.mean().item(), max_abs_delta_logp=deltas.max().item())
        results.append(result)
    for result in results:
        result["speedup_vs_" + args.precision[0]] = common.ratio(results[0]["seconds"], result["seconds"])
    return {"benchmark": "source_scoring", "model": str(args.model_path or args.model),
            "random_weights": args.model_path is None, "rows": len(rows), "sequences": len(sequences),
            "tokens": tokens, "response_tokens": response_tokens, "batch_tokens": args.batch_tokens,
            "repeats": args.repeats, "reference_precision": args.precision[0], "goal": ">= 1.7x at <= 0.02 nat mean",
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(common.SHAPES), default="tiny",
                        help="shape of the random source (default tiny; issue #8: 0.5-3B, e.g. llama-1b, llama-3b)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a HF model directory (with tokenizer.json) to score with instead of a random model")
    default = ["bf16", "fp8"] if torch.cuda.is_available() else ["fp32", "bf16"]
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "fp8"), default=default,
                        help="precisions side by side; the first is the reference (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=8, help="preference rows (2 sequences each)")
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--response-words", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=1024, help="padded tokens per forward pass")
    parser.add_argument("--repeats", type=int, default=3)
    common.add_output_arguments(parser, name="source_scoring")
    args = parser.parse_args()
    report = measure(args)
    reference = args.precision[0]
    common.print_table(
        f"source_scoring: {report['model']}, {report['rows']} rows, {report['tokens']:,} tokens per pass "
        f"(median of {args.repeats}); deltas per response token vs {reference}",
        report["results"],
        ["precision", "seconds", "tokens_per_sec", f"speedup_vs_{reference}", "mean_abs_delta_logp",
         "max_abs_delta_logp"])
    common.write_json(args.out, report)


if __name__ == "__main__":
    main()
