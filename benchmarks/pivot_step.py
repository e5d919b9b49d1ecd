"""pivot_step: one optimizer step of the pivot under our trainer (forward + backward through Megatron-Core's schedule,
then the optimizer), per precision, side by side in one run: step time, tokens/s, MFU, peak GPU memory.

Each precision is a run of the real entry point (``launch/pretrain_infifpo.py``, one process, TP 1 x PP 1) on
synthetic pairs that fill ``--seq-length`` (chosen and rejected: 2 sequences per pair), with cached reference scores
(loss dpo) so that nothing but training is timed. Step times are medians after ``--warmup-steps``.

MFU = model FLOPs per token (``monitoring.gpt_flops_per_token``: 6 N + 12 L s h) x tokens/s / the GPU's dense BF16
peak (989 TFLOP/s on an H100 SXM), as the trainer reports it; on CPU there is no peak and no MFU.

  CPU proof run (seconds):   python -m benchmarks.pivot_step
  H100, issue #8 shapes:     python -m benchmarks.pivot_step --model llama-1b --seq-length 2048 --precision bf16 fp8
                             python -m benchmarks.pivot_step --model smollm2-135m --seq-length 2048 --precision bf16 fp8

``--precision fp8`` trains with ``train.precision=fp8`` (TE's FP8 GEMMs, bf16 weights); where FP8 cannot run (no FP8
GPU or no Transformer Engine) it is reported as unavailable, with the reason, and no figure is faked.
"""

from __future__ import annotations

import argparse

from benchmarks import common
from infifpo_mcore import monitoring
from infifpo_mcore.config import fp8_missing
from infifpo_mcore.parallel import local_device


def measure(args: argparse.Namespace) -> dict:
    shape = common.SHAPES[args.model]
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = common.write_preference_data(
        args.workdir / "pairs.jsonl", rows=max(args.global_batch_size * args.steps, 8),
        prompt_words=args.seq_length // 4, response_words=args.seq_length, fill_tokens=args.seq_length)
    flops_per_token = monitoring.gpt_flops_per_token(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
        vocab_size=shape.vocab_size, seq_length=args.seq_length, swiglu=True)
    results = []
    for precision in args.precision:
        if precision == "fp8" and (missing := fp8_missing(local_device())):
            status = f"unavailable: {'; '.join(missing)}"
            print(f"precision fp8: {status}; skipped")
            results.append({"precision": "fp8", "status": status})
            continue
        run_dir = args.workdir / precision
        overrides = common.training_overrides(
            shape=shape, data=data, run_dir=run_dir, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, steps=args.steps,
            precision=precision) + ["loss.type=dpo"]
        metrics = common.run_training(nproc=1, overrides=overrides, run_dir=run_dir)
        results.append({"precision": precision, "status": "measured",
                        **common.steady_state(metrics, warmup_steps=args.warmup_steps)})
    measured = [result for result in results if result["status"] == "measured"]
    for result in measured:
        result["speedup_vs_" + measured[0]["precision"]] = common.ratio(measured[0]["step_seconds"],
                                                                        result["step_seconds"])
        result["model_tflops_per_sec"] = flops_per_token * result["tokens_per_sec"] / 1e12
    return {"benchmark": "pivot_step", "model": args.model, "shape": vars(shape), "seq_length": args.seq_length,
            "micro_batch_size_pairs": args.micro_batch_size, "global_batch_size_pairs": args.global_batch_size,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "model_flops_per_token": flops_per_token,
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(common.SHAPES), default="tiny", help="pivot shape (default tiny)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "fp8"), default=[common.default_precision()],
                        help="precisions to run side by side, the first is the baseline (default: bf16 on GPU, "
                             "fp32 on CPU)")
    parser.add_argument("--seq-length", type=int, default=128, help="tokens per sequence (issue #8: 2048)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    parser.add_argument("--global-batch-size", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the statistics")
    common.add_output_arguments(parser, name="pivot_step")
    args = parser.parse_args()
    report = measure(args)
    common.print_table(
        f"pivot_step: {args.model}, seq {args.seq_length}, {args.global_batch_size} pairs/step "
        f"(medians of {args.steps - args.warmup_steps} steps)",
        report["results"],
        ["precision", "status", "step_seconds", "time_forward_backward_seconds", "time_optimizer_seconds",
         "tokens_per_sec", "model_tflops_per_sec", "mfu", "peak_gpu_memory_used_gib",
         "speedup_vs_" + next((r["precision"] for r in report["results"] if r["status"] == "measured"), "-")])
    common.write_json(args.out, report)


if __name__ == "__main__":
    main()
