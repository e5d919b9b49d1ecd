"""online_overlap: how much of the source scoring the online source group hides behind training.

Three measurements in one run, on the same rows, shape, batch and precision:
  1. scoring: the product's ``SourceScorer`` alone scores global batches with every source: seconds per batch per
     source; the source group's time per batch is the slowest source rank's share under ``source_assignment``;
  2. offline: the real entry point trains on the rows with the scores cached in the data (``fuse_*``);
  3. online: the same run with ``sources.num_ranks`` extra ranks scoring each batch while the pivot trains.
exposed = online step time - offline step time (clamped to [0, scoring]); hidden fraction = 1 - exposed / scoring.
The online trainer's ``time/data`` (waiting for scores) is reported beside it.

On CPU every process shares the same cores, so scoring competes with training instead of running beside it: the
proof run shows the script works, not the overlap. On a GPU machine give each rank its own GPU (the training ranks
and the source ranks are separate torchrun ranks: ``--training-ranks`` + ``--source-ranks`` GPUs).

  CPU proof run:  python -m benchmarks.online_overlap
  GPUs (2):       python -m benchmarks.online_overlap --model llama-1b --source-model llama-1b --seq-length 2048 \
                      --global-batch-size 8 --steps 12 --warmup-steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks import common
from infifpo_mcore.config import SourceConfig, SourceTokenizerConfig, TokenizerType
from infifpo_mcore.data import read_preference_rows
from infifpo_mcore.parallel import local_device
from infifpo_mcore.source_group import source_assignment
from infifpo_mcore.sources import build_scorer, prepare_source


def _sources(args: argparse.Namespace) -> list[dict]:
    """``sources.models`` entries: random Llamas of ``--source-model``'s shape, one seed each."""
    entries = []
    for index in range(args.num_sources):
        directory = args.workdir / f"source{index}"
        if not (directory / "config.json").is_file():
            common.save_random_hf_model(common.SHAPES[args.source_model], directory,
                                        max_positions=4 * args.seq_length, seed=index + 1)
        entries.append({"name": f"source{index}", "path": str(directory), "tokenizer": common.SOURCE_TOKENIZER,
                        "precision": args.source_precision})
    return entries


def _scoring_seconds(args: argparse.Namespace, *, sources: list[dict], rows) -> list[float]:
    """Median seconds to score one global batch, per source, with the product's scorer (after one warm-up batch)."""
    device = local_device()
    batch = args.global_batch_size
    batches = [rows[start:start + batch] for start in range(0, len(rows) - batch + 1, batch)][: args.steps]
    seconds = []
    for entry in sources:
        source = SourceConfig(name=entry["name"], path=entry["path"], precision=entry["precision"],
                              tokenizer=SourceTokenizerConfig(type=TokenizerType(entry["tokenizer"]["type"]),
                                                              path=entry["tokenizer"]["path"],
                                                              chat_template=entry["tokenizer"]["chat_template"]))
        prepared = prepare_source(source, device=device, workdir=args.workdir / "tokenizers" / entry["name"])
        scorer = build_scorer(prepared, device=device, batch_tokens=args.batch_tokens)
        scorer.score(batches[0])
        timings = []
        for rows_of_batch in batches:
            common.synchronize()
            start = time.perf_counter()
            scorer.score(rows_of_batch)
            common.synchronize()
            timings.append(time.perf_counter() - start)
        seconds.append(statistics.median(timings))
        del scorer
    return seconds


def measure(args: argparse.Namespace) -> dict:
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = common.SHAPES[args.model]
    rows_needed = max(args.global_batch_size * args.steps, 8)
    # The same rows twice: with cached source scores (offline) and without them (online refuses fuse_* data).
    cached = common.write_preference_data(args.workdir / "cached.jsonl", rows=rows_needed,
                                          prompt_words=args.seq_length // 4, response_words=args.seq_length,
                                          fill_tokens=args.seq_length, num_sources=args.num_sources)
    plain = args.workdir / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if not k.startswith("fuse_")})
                             + "\n" for line in cached.read_text().splitlines()))
    sources = _sources(args)
    per_source = _scoring_seconds(args, sources=sources, rows=read_preference_rows(plain))
    placement = source_assignment(num_sources=args.num_sources, group_size=args.source_ranks)
    group_seconds = max(sum(per_source[index] / replicas for index, _, replicas in held) for held in placement)

    runs = {}
    for mode, data, extra, nproc in (
            ("offline", cached, [], args.training_ranks),
            ("online", plain, [f"sources.num_ranks={args.source_ranks}", f"sources.models={json.dumps(sources)}",
                               f"sources.batch_tokens={args.batch_tokens}"], args.training_ranks + args.source_ranks)):
        run_dir = args.workdir / mode
        overrides = common.training_overrides(
            shape=shape, data=data, run_dir=run_dir, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, steps=args.steps,
            precision=args.precision) + ["loss.type=infifpo", "loss.length_norm=true", *extra]
        metrics = common.run_training(nproc=nproc, overrides=overrides, run_dir=run_dir)
        runs[mode] = {"mode": mode, "processes": nproc, **common.steady_state(metrics, warmup_steps=args.warmup_steps)}
    exposed = min(max(runs["online"]["step_seconds"] - runs["offline"]["step_seconds"], 0.0), group_seconds)
    return {"benchmark": "online_overlap", "model": args.model, "source_model": args.source_model,
            "num_sources": args.num_sources, "source_ranks": args.source_ranks, "training_ranks": args.training_ranks,
            "seq_length": args.seq_length, "precision": args.precision, "source_precision": args.source_precision,
            "global_batch_size_pairs": args.global_batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "scoring_seconds_per_batch_per_source": per_source, "source_group_seconds_per_batch": group_seconds,
            "results": list(runs.values()), "exposed_scoring_seconds_per_step": exposed,
            "hidden_fraction": 1.0 - common.ratio(exposed, group_seconds),
            "online_over_offline_step_time": common.ratio(runs["online"]["step_seconds"],
                                                          runs["offline"]["step_seconds"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(common.SHAPES), default="tiny", help="pivot shape (default tiny)")
    parser.add_argument("--source-model", choices=sorted(common.SHAPES), default="tiny", help="source shape")
    parser.add_argument("--num-sources", type=int, default=1)
    parser.add_argument("--source-ranks", type=int, default=1, help="sources.num_ranks of the online run")
    parser.add_argument("--training-ranks", type=int, default=1, help="data-parallel training ranks")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=common.default_precision())
    parser.add_argument("--source-precision", choices=("auto", "fp32", "bf16", "fp8"), default="auto")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    parser.add_argument("--global-batch-size", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="sources.batch_tokens")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out (includes model loading)")
    common.add_output_arguments(parser, name="online_overlap")
    args = parser.parse_args()
    report = measure(args)
    common.print_table(
        f"online_overlap: pivot {args.model}, {args.num_sources} x source {args.source_model} on "
        f"{args.source_ranks} source rank(s); scoring {report['source_group_seconds_per_batch']:.4g} s per batch",
        report["results"],
        ["mode", "processes", "step_seconds", "step_seconds_stdev", "time_data_seconds",
         "time_forward_backward_seconds", "tokens_per_sec"])
    print(f"exposed scoring per step: {report['exposed_scoring_seconds_per_step']:.4g} s; hidden fraction: "
          f"{report['hidden_fraction']:.3f}; online / offline step time: {report['online_over_offline_step_time']:.3f}")
    common.write_json(args.out, report)


if __name__ == "__main__":
    main()
