"""infifpo_vs_dpo: the cost of InfiFPO's fused reference over plain DPO, as a step-time ratio measured side by side.

Identical runs of the real entry point (same shape, data, batch, seed, precision) that differ only in ``loss.type``:
``dpo`` (reference = the cached pivot-init scores) and ``infifpo`` (reference fused from ``--num-sources`` cached
source scores: length norm, clipping against the pivot init, ``--fusion``). Both read every score from the data, so
the difference is the loss on the last stage. With ``--repeats`` > 1 the two alternate (dpo, infifpo, dpo, ...) so
that drift in the machine hits both; the ratio is of medians over all measured steps. Goal (issue #8): <= 1.03.

  CPU proof run:  python -m benchmarks.infifpo_vs_dpo
  H100:           python -m benchmarks.infifpo_vs_dpo --model llama-1b --seq-length 2048 --global-batch-size 8 \
                      --steps 12 --repeats 3
"""

from __future__ import annotations

import argparse

from benchmarks import common

LOSSES = ("dpo", "infifpo")


def measure(args: argparse.Namespace) -> dict:
    shape = common.SHAPES[args.model]
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = common.write_preference_data(
        args.workdir / "pairs.jsonl", rows=max(args.global_batch_size * args.steps, 8),
        prompt_words=args.seq_length // 4, response_words=args.seq_length, fill_tokens=args.seq_length,
        num_sources=args.num_sources)
    steps = {loss: [] for loss in LOSSES}
    for repeat in range(args.repeats):
        for loss in LOSSES:
            run_dir = args.workdir / f"{loss}_{repeat}"
            overrides = common.training_overrides(
                shape=shape, data=data, run_dir=run_dir, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, steps=args.steps,
                precision=args.precision,
            ) + [f"loss.type={loss}", "loss.length_norm=true", "loss.clip=true", f"loss.fusion={args.fusion}"]
            steps[loss] += common.run_training(nproc=1, overrides=overrides, run_dir=run_dir)[args.warmup_steps:]
    results = [{"loss": loss, **common.steady_state(steps[loss], warmup_steps=0)} for loss in LOSSES]
    dpo, infifpo = results
    ratios = {
        "step_time_ratio_infifpo_over_dpo": common.ratio(infifpo["step_seconds"], dpo["step_seconds"]),
        "forward_backward_ratio_infifpo_over_dpo": common.ratio(infifpo["time_forward_backward_seconds"],
                                                                dpo["time_forward_backward_seconds"]),
    }
    return {"benchmark": "infifpo_vs_dpo", "model": args.model, "shape": vars(shape), "seq_length": args.seq_length,
            "precision": args.precision, "num_sources": args.num_sources, "fusion": args.fusion,
            "micro_batch_size_pairs": args.micro_batch_size, "global_batch_size_pairs": args.global_batch_size,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats, "goal": "<= 1.03",
            "results": results, **ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(common.SHAPES), default="tiny", help="pivot shape (default tiny)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=common.default_precision())
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    parser.add_argument("--global-batch-size", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=5, help="steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps of each run left out")
    parser.add_argument("--repeats", type=int, default=1, help="alternating dpo/infifpo pairs of runs")
    parser.add_argument("--num-sources", type=int, default=2, help="cached source scores per row")
    parser.add_argument("--fusion", choices=("mean", "sum", "max_margin"), default="mean")
    common.add_output_arguments(parser, name="infifpo_vs_dpo")
    args = parser.parse_args()
    report = measure(args)
    common.print_table(
        f"infifpo_vs_dpo: {args.model}, seq {args.seq_length}, {args.global_batch_size} pairs/step, "
        f"{args.num_sources} sources, {args.repeats} x {args.steps - args.warmup_steps} measured steps each",
        report["results"],
        ["loss", "step_seconds", "step_seconds_stdev", "time_forward_backward_seconds", "time_optimizer_seconds",
         "tokens_per_sec", "measured_steps"])
    print(f"step time infifpo / dpo: {report['step_time_ratio_infifpo_over_dpo']:.4f} (goal <= 1.03); "
          f"forward-backward: {report['forward_backward_ratio_infifpo_over_dpo']:.4f}")
    common.write_json(args.out, report)


if __name__ == "__main__":
    main()
