"""packing: padded vs packed vs packed + shared-prompt micro-batches (``data.packing``, ``data.share_prompt``), pairs
per second side by side in one run.

Runs of the real entry point (``launch/pretrain_infifpo.py``, one process, TP 1 x PP 1, loss dpo) on the same pairs,
shape, batch and seed that differ only in the two keys. The modes alternate (unpadded, packed, shared, unpadded, ...)
over ``--repeats`` so that drift in the machine hits all; each figure is a median over every measured step.

Data (``--data``):
  real  the bundled preference pairs, launch/data/tiny_prefs_train.jsonl: BIG-bench ``elementary_math_qa`` (MathQA
        word problems; chosen = the correct choice, rejected = a wrong one, "The answer is 270."), 384 rows. In the
        pivot's tokens (Mistral v1, its chat template): prompts 17-119 tokens (mean 53.6), responses 7-14 (mean 8.7).
        At ``--seq-length`` 128 padding is 51 % of the unpacked tokens; a shared prompt leaves 28 % of them to compute.
        The pivot init scores the rows once before step 1 (the reference of dpo), outside the timed steps.
  fill  synthetic pairs whose every sequence fills ``--seq-length`` (``common.write_preference_data``): ~0 % padding,
        the control where packing has nothing to remove and a shared prompt little.

Per mode: step time, pairs/s = global batch / step time, useful tokens/s = pairs/s x the mean non-pad tokens of a
pair as unpacked computes them (prompt + response, per response: one numerator for every mode), and the ratios to the
unpacked run; also the fastest step's pairs/s and its ratio (on a shared machine other jobs only ever add time, so
the fastest steps show the cost of the work itself; the medians are the figures). ``tokens_per_sec`` as the trainer logs it counts the tokens each mode computes (the prompt once when
shared). Goal (issue #18): >= 1.5x pairs/s where padding is >= 40 % of the unpacked tokens.

``--scoring``: source scoring instead, the product's ``SourceScorer.score`` over the same rows with
``sources.share_prompt`` false (two sequences per row) and true (one, the prompt computed once), a randomly
initialised transformers Llama of ``--model``'s shape with the pivot's tokenizer, alternating ``--repeats`` times:
rows/s and the ratio.

  CPU:   python -m benchmarks.packing --model small --repeats 3
         python -m benchmarks.packing --model small --data fill --repeats 2   (the control)
  H100:  python -m benchmarks.packing --model smollm2-135m --seq-length 128 --global-batch-size 64 \\
             --micro-batch-size 8 --precision bf16 --repeats 3
         (--seq-length 128 keeps the real rows whole; on TE the packed run takes Megatron's THD path and shared is
         refused there: run it with TE absent or pass --modes unpacked packed)
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks import common
from infifpo_mcore.data import load_preference_dataset
from infifpo_mcore.tokenization import build_tokenizer

MODES = {"unpacked": ["data.packing=false"], "packed": ["data.packing=true", "data.share_prompt=false"],
         "shared": ["data.packing=true", "data.share_prompt=true"]}
REAL_DATA = common.REPO / "launch" / "data" / "tiny_prefs_train.jsonl"
CHAT_TEMPLATE = {"real": "mistral", "fill": "plain"}


def data_profile(path, *, seq_length: int, chat_template: str) -> dict:
    """The pairs as the trainer tokenises them: lengths, the padding share unpacked and what a shared prompt
    leaves (``packing.pair_tokens``' count, over the unpacked padded tokens)."""
    from infifpo_mcore.packing import pair_tokens

    settings = dict(override.removeprefix("tokenizer.").split("=", 1) for override in common.PIVOT_TOKENIZER)
    tokenizer = build_tokenizer(**settings, chat_template=chat_template)
    dataset = load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=seq_length, max_prompt_length=None)
    prompts = [len(example["prompt_ids"]) for example in dataset]
    responses = [len(example[f"{side}_ids"]) for example in dataset for side in ("chosen", "rejected")]
    useful = [pair_tokens(example, share_prompt=False) for example in dataset]
    padded = 2 * seq_length * len(dataset)
    return {"rows": len(dataset), "truncated_rows": dataset.num_truncated,
            "prompt_tokens": {"min": min(prompts), "mean": statistics.mean(prompts), "max": max(prompts)},
            "response_tokens": {"min": min(responses), "mean": statistics.mean(responses), "max": max(responses)},
            "useful_tokens_per_pair": statistics.mean(useful),
            "padding_share_unpacked": 1 - sum(useful) / padded,
            "shared_prompt_tokens_share": sum(pair_tokens(e, share_prompt=True) for e in dataset) / padded}


def _rows_file(args: argparse.Namespace):
    if args.data == "fill":
        return common.write_preference_data(
            args.workdir / "pairs.jsonl", rows=max(args.global_batch_size * args.steps, 8),
            prompt_words=args.seq_length // 4, response_words=args.seq_length, fill_tokens=args.seq_length)
    if args.rows is None:
        return REAL_DATA
    data = args.workdir / "pairs.jsonl"  # the first rows only
    data.write_text("".join(REAL_DATA.read_text().splitlines(keepends=True)[:args.rows]))
    return data


def measure_scoring(args: argparse.Namespace) -> dict:
    """Source scoring with and without a shared prompt (``--scoring``)."""
    import time

    import torch

    from infifpo_mcore.data import read_preference_rows
    from infifpo_mcore.sources import SourceScorer, load_model

    shape = common.SHAPES[args.model]
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = _rows_file(args)
    profile = data_profile(data, seq_length=args.seq_length, chat_template=CHAT_TEMPLATE[args.data])
    model_dir = common.save_random_hf_model(shape, args.workdir / "source", max_positions=4 * args.seq_length)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir=model_dir, gguf_file=None, precision=args.precision, device=device)
    settings = dict(override.removeprefix("tokenizer.").split("=", 1) for override in common.PIVOT_TOKENIZER)
    tokenizer = build_tokenizer(**settings, chat_template=CHAT_TEMPLATE[args.data])
    rows = read_preference_rows(data)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    scores = {}
    for _ in range(args.repeats):
        for share in (False, True):
            scorer = SourceScorer(name="source", model=model, tokenizer=tokenizer, device=device,
                                  batch_tokens=args.batch_tokens, share_prompt=share)
            common.synchronize()
            start = time.perf_counter()
            scores[share] = scorer.score(rows)
            common.synchronize()
            seconds[share].append(time.perf_counter() - start)
    delta = max(abs(a - b) for two, one in zip(scores[False], scores[True]) for a, b in zip(two[:2], one[:2]))
    results = [{"share_prompt": share, "seconds": statistics.median(seconds[share]),
                "rows_per_sec": len(rows) / statistics.median(seconds[share])} for share in (False, True)]
    results[1]["rows_per_sec_vs_two_sequences"] = common.ratio(results[1]["rows_per_sec"], results[0]["rows_per_sec"])
    return {"benchmark": "packing", "what": "source scoring", "data": args.data, "data_path": str(data),
            "data_profile": profile, "model": args.model, "shape": vars(shape), "precision": args.precision,
            "batch_tokens": args.batch_tokens, "repeats": args.repeats, "max_abs_delta_logp_sum": delta,
            "results": results}


def measure(args: argparse.Namespace) -> dict:
    shape = common.SHAPES[args.model]
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = _rows_file(args)
    profile = data_profile(data, seq_length=args.seq_length, chat_template=CHAT_TEMPLATE[args.data])
    steps = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        for mode in args.modes:
            run_dir = args.workdir / f"{mode}_{repeat}"
            overrides = common.training_overrides(
                shape=shape, data=data, run_dir=run_dir, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, steps=args.steps,
                precision=args.precision,
            ) + ["loss.type=dpo", f"tokenizer.chat_template={CHAT_TEMPLATE[args.data]}", *MODES[mode]]
            steps[mode] += common.run_training(nproc=1, overrides=overrides, run_dir=run_dir)[args.warmup_steps:]
    results = []
    for mode in args.modes:
        summary = common.steady_state(steps[mode], warmup_steps=0)
        pairs_per_sec = args.global_batch_size / summary["step_seconds"]
        fastest = min(sum(step[key] for key in common.TIME_KEYS) for step in steps[mode])
        results.append({"mode": mode, **summary, "pairs_per_sec": pairs_per_sec,
                        "useful_tokens_per_sec": pairs_per_sec * profile["useful_tokens_per_pair"],
                        "fastest_step_pairs_per_sec": args.global_batch_size / fastest})
    baseline = results[0]
    for result in results:
        for key in ("pairs_per_sec", "fastest_step_pairs_per_sec"):
            result[f"{key}_vs_{baseline['mode']}"] = common.ratio(result[key], baseline[key])
    return {"benchmark": "packing", "data": args.data, "data_path": str(data), "data_profile": profile,
            "model": args.model, "shape": vars(shape), "seq_length": args.seq_length, "precision": args.precision,
            "micro_batch_size_pairs": args.micro_batch_size, "global_batch_size_pairs": args.global_batch_size,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
            "goal": ">= 1.5x pairs/s where padding >= 40 %", "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(common.SHAPES), default="tiny", help="pivot shape (default tiny)")
    parser.add_argument("--data", choices=("real", "fill"), default="real", help="length distribution (see above)")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES),
                        help="runs side by side, the first is the baseline (default: all three)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=common.default_precision())
    parser.add_argument("--seq-length", type=int, default=128, help="model.seq_length (128: no real row is cut)")
    parser.add_argument("--micro-batch-size", type=int, default=4,
                        help="pairs per unpacked micro-batch; packed: a budget of that many pairs' padded tokens")
    parser.add_argument("--global-batch-size", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=8, help="steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps of each run left out")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds of the modes")
    parser.add_argument("--rows", type=int, default=None, help="real data: the first ROWS pairs only (default all)")
    parser.add_argument("--scoring", action="store_true", help="source scoring, two sequences vs a shared prompt")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="--scoring: sources.batch_tokens")
    common.add_output_arguments(parser, name="packing")
    args = parser.parse_args()
    if args.scoring:
        report = measure_scoring(args)
        common.print_table(
            f"packing --scoring: source scoring of {report['data_profile']['rows']} {args.data} rows, random "
            f"{args.model} Llama, {args.repeats} repeats (max |delta| of a log-prob sum "
            f"{report['max_abs_delta_logp_sum']:.2e})", report["results"],
            ["share_prompt", "seconds", "rows_per_sec", "rows_per_sec_vs_two_sequences"])
        common.write_json(args.out, report)
        return
    report = measure(args)
    profile = report["data_profile"]
    common.print_table(
        f"packing: {args.model}, {args.data} data ({profile['rows']} pairs, padding "
        f"{100 * profile['padding_share_unpacked']:.1f} % unpacked, shared prompt computes "
        f"{100 * profile['shared_prompt_tokens_share']:.1f} % of the padded tokens), seq {args.seq_length}, "
        f"{args.global_batch_size} pairs/step, {args.repeats} x {args.steps - args.warmup_steps} measured steps each",
        report["results"],
        ["mode", "step_seconds", "step_seconds_stdev", "time_forward_backward_seconds", "pairs_per_sec",
         "useful_tokens_per_sec", "tokens_per_sec", f"pairs_per_sec_vs_{args.modes[0]}",
         f"fastest_step_pairs_per_sec_vs_{args.modes[0]}", "measured_steps"])
    common.write_json(args.out, report)


if __name__ == "__main__":
    main()
