"""vs_trl: our trainer against TRL's ``DPOTrainer`` (what the TRL-based InfiFPO reference code runs) on one device:
the same Llama shape (random init), the same pairs, sequence length, micro and global batch, precision and number of
steps; training throughput (tokens/s and pairs/s) of each, and their ratio. Goal (issue #8, one H100): >= 3x.

Ours: the real entry point (``launch/pretrain_infifpo.py``, one process, loss dpo, reference scores cached in the
data). TRL: ``DPOTrainer`` with ``precompute_ref_log_probs=True``, so its reference forward also runs once before
training and not in the timed steps; ``bf16=True`` on a GPU (fp32 on CPU), its default AdamW, no gradient
checkpointing. Both truncate every sequence to ``--seq-length`` and the data fills it, so both process
2 x seq-length tokens per pair; each side's token count is taken from its own tokenisation. Step time: ours from
metrics.jsonl (data + forward/backward + optimizer), TRL's between consecutive optimizer steps (a callback, with CUDA
synchronised); medians after ``--warmup-steps``.

  CPU proof run:  python -m benchmarks.vs_trl
  H100:           python -m benchmarks.vs_trl --model llama-1b --seq-length 2048 --micro-batch-size 1 \
                      --global-batch-size 8 --steps 12 --warmup-steps 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import torch

from benchmarks import common
from infifpo_mcore.tokenization import resolve_path


def _trl_tokenizer(workdir):
    """The pivot's sentencepiece model as a transformers tokenizer (the same ids as our side)."""
    from transformers import LlamaTokenizer

    directory = workdir / "tokenizer"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(resolve_path(common.PIVOT_TOKENIZER[1].split("=", 1)[1]), directory / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(directory)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def run_trl(args: argparse.Namespace, *, data) -> dict:
    from datasets import load_dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def _tick(self):
            common.synchronize()
            self.times.append(time.perf_counter())

        def on_train_begin(self, *_, **__):
            self._tick()

        def on_step_end(self, *_, **__):
            self._tick()

    torch.manual_seed(0)
    gpu = torch.cuda.is_available()
    model = LlamaForCausalLM(common.SHAPES[args.model].hf_config(max_positions=args.seq_length))
    dataset = load_dataset("json", data_files=str(data), split="train").select_columns(["prompt", "chosen", "rejected"])
    config = DPOConfig(
        output_dir=str(args.workdir / "trl"), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.global_batch_size // args.micro_batch_size, max_steps=args.steps,
        learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1, max_length=args.seq_length,
        truncation_mode="keep_start", precompute_ref_log_probs=True, bf16=args.precision == "bf16", use_cpu=not gpu,
        logging_strategy="no", report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=_trl_tokenizer(args.workdir),
                         callbacks=[clock])
    tokenised = trainer.train_dataset
    pair_tokens = statistics.mean(
        min(len(p) + len(c), args.seq_length) + min(len(p) + len(r), args.seq_length)
        for p, c, r in zip(tokenised["prompt_ids"], tokenised["chosen_ids"], tokenised["rejected_ids"]))
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step_seconds = [later - earlier for earlier, later in zip(clock.times, clock.times[1:])][args.warmup_steps:]
    median = statistics.median(step_seconds)
    result = {"trainer": f"trl DPOTrainer {common._version('trl')}", "step_seconds": median,
              "step_seconds_stdev": statistics.stdev(step_seconds) if len(step_seconds) > 1 else None,
              "tokens_per_sec": pair_tokens * args.global_batch_size / median,
              "pairs_per_sec": args.global_batch_size / median, "measured_steps": len(step_seconds)}
    if gpu:
        result["peak_gpu_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_ours(args: argparse.Namespace, *, data) -> dict:
    run_dir = args.workdir / "ours"
    overrides = common.training_overrides(
        shape=common.SHAPES[args.model], data=data, run_dir=run_dir, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, steps=args.steps,
        precision=args.precision) + ["loss.type=dpo", "loss.beta=0.1", "train.lr=1e-5", "train.min_lr=1e-5",
                                                       "train.lr_schedule=constant"]
    stats = common.steady_state(common.run_training(nproc=1, overrides=overrides, run_dir=run_dir),
                                warmup_steps=args.warmup_steps)
    return {"trainer": "infifpo-mcore", **stats, "pairs_per_sec": args.global_batch_size / stats["step_seconds"]}


def measure(args: argparse.Namespace) -> dict:
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = common.write_preference_data(
        args.workdir / "pairs.jsonl", rows=max(args.global_batch_size * args.steps, 8),
        prompt_words=args.seq_length // 4, response_words=args.seq_length, fill_tokens=args.seq_length)
    ours = run_ours(args, data=data)  # first, in its own processes: its GPU memory is free again for TRL
    trl = run_trl(args, data=data)
    return {"benchmark": "vs_trl", "model": args.model, "shape": vars(common.SHAPES[args.model]),
            "seq_length": args.seq_length, "precision": args.precision,
            "micro_batch_size_pairs": args.micro_batch_size, "global_batch_size_pairs": args.global_batch_size,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "goal": ">= 3x tokens/s",
            "results": [ours, trl],
            "tokens_per_sec_ratio_ours_over_trl": common.ratio(ours["tokens_per_sec"], trl["tokens_per_sec"]),
            "pairs_per_sec_ratio_ours_over_trl": common.ratio(ours["pairs_per_sec"], trl["pairs_per_sec"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(common.SHAPES), default="tiny", help="Llama shape (default tiny)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=common.default_precision())
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    parser.add_argument("--global-batch-size", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the statistics")
    common.add_output_arguments(parser, name="vs_trl")
    args = parser.parse_args()
    report = measure(args)
    common.print_table(
        f"vs_trl: {args.model}, seq {args.seq_length}, {args.global_batch_size} pairs/step, {args.precision} "
        f"(medians of {args.steps - args.warmup_steps} steps)",
        report["results"],
        ["trainer", "step_seconds", "step_seconds_stdev", "tokens_per_sec", "pairs_per_sec",
         "peak_gpu_memory_used_gib", "peak_gpu_memory_allocated_gib"])
    print(f"tokens/s ours / TRL: {report['tokens_per_sec_ratio_ours_over_trl']:.3f} (goal >= 3)")
    common.write_json(args.out, report)


if __name__ == "__main__":
    main()
