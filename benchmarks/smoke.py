"""smoke: the GPU smoke kit's steps, one after another inside one time budget, every result as JSON in one folder.

On the borrowed GPU (one H200, about 8 minutes of a 10-minute call) this is what ``bash benchmarks/gpu/smoke.sh``
runs after installing the wheels it carries; ``--dry-run`` runs the same steps on CPU (gloo) at the tiny shape, which
``tests/test_benchmarks.py`` executes so that the kit cannot rot. Steps, in order (each a run of the product's own
entry point or benchmark script, in its own processes, with a time cap; a step that fails or runs out of time is
recorded and the next one runs):

  trainer         launch/pretrain_infifpo.py, ~20 steps: NCCL, bf16, a ~1B Llama shape (llama-1b, seq 2048), the
                  distributed optimizer with the overlapped weight gather; per-step losses, tokens/s and MFU
  pivot_step      benchmarks/pivot_step.py: step time, tokens/s, MFU; fp8 reported unavailable without TE
  vs_trl          benchmarks/vs_trl.py: tokens/s against TRL's DPOTrainer, same shape and batch
  source_scoring  benchmarks/source_scoring.py: bf16 against fp32 scoring, speed and |delta log-prob|

Written to ``--out`` (flat, at most 8 files, as the device tool returns them): ``<step>.json`` for each step,
``smoke.json`` (each step's status, seconds and key figures, the environment, the source fingerprint) and
``smoke.log`` (each step's output tail). Work files go to ``--workdir``.

The GPU machine receives a copy of the working tree without git: ``source_fingerprint`` (sha256 over the Python
sources) tells which code ran; ``python -m benchmarks.smoke --fingerprint`` prints this checkout's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks import common

REPO = common.REPO


@dataclass(frozen=True)
class Size:
    """What a step runs at: the GPU figures, or the CPU rehearsal's."""
    model: str
    seq_length: int
    global_batch_size: int
    precision: str  # the trainer's and vs_trl's; source_scoring compares bf16 with fp32 on both
    trainer_steps: int
    benchmark_steps: int
    warmup_steps: int
    rows: int
    words: int


GPU = Size(model="llama-1b", seq_length=2048, global_batch_size=8, precision="bf16", trainer_steps=20,
           benchmark_steps=8, warmup_steps=2, rows=64, words=512)
DRY_RUN = Size(model="tiny", seq_length=64, global_batch_size=4, precision="fp32", trainer_steps=20,
               benchmark_steps=3, warmup_steps=1, rows=2, words=8)


def source_fingerprint() -> str:
    """sha256 over the package's, the launcher's and the benchmarks' Python sources (path and content)."""
    digest = hashlib.sha256()
    for path in sorted(p for folder in ("infifpo_mcore", "launch", "benchmarks") for p in (REPO / folder).rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Steps: each returns (command, the JSON it writes, a function of that JSON -> the figures smoke.json keeps)
def _benchmark(module: str, out: Path, work: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", f"benchmarks.{module}", *args, "--out", str(out / f"{module}.json"),
            "--workdir", str(work / module)]


def _trainer(size: Size, out: Path, work: Path) -> tuple[list[str], Callable[[dict], dict]]:
    shape = common.SHAPES[size.model]
    work.mkdir(parents=True, exist_ok=True)
    data = common.write_preference_data(work / "trainer_pairs.jsonl", rows=size.global_batch_size * size.trainer_steps,
                                        prompt_words=size.seq_length // 4, response_words=size.seq_length,
                                        fill_tokens=size.seq_length)
    overrides = common.training_overrides(
        shape=shape, data=data, run_dir=work / "trainer", seq_length=size.seq_length, micro_batch_size=1,
        global_batch_size=size.global_batch_size, steps=size.trainer_steps, precision=size.precision) + [
        "loss.type=dpo", "parallel.distributed_optimizer=true", "parallel.overlap_param_gather=true"]
    command = [sys.executable, "-m", "benchmarks.smoke", "--trainer-run", str(out / "trainer.json"), "--", *overrides]
    return command, lambda report: {key: report[key] for key in ("steps", "first_loss", "last_loss", "step_seconds",
                                                                  "tokens_per_sec", "mfu", "peak_gpu_memory_used_gib")
                                    if key in report}


def _pivot_step(size: Size, out: Path, work: Path) -> tuple[list[str], Callable[[dict], dict]]:
    command = _benchmark("pivot_step", out, work, "--model", size.model, "--seq-length", str(size.seq_length),
                         "--precision", size.precision, "fp8", "--global-batch-size", str(size.global_batch_size),
                         "--steps", str(size.benchmark_steps), "--warmup-steps", str(size.warmup_steps))
    return command, lambda report: {result["precision"]: {key: result.get(key) for key in
                                                          ("status", "step_seconds", "tokens_per_sec", "mfu")}
                                    for result in report["results"]}


def _vs_trl(size: Size, out: Path, work: Path) -> tuple[list[str], Callable[[dict], dict]]:
    command = _benchmark("vs_trl", out, work, "--model", size.model, "--seq-length", str(size.seq_length),
                         "--precision", size.precision, "--global-batch-size", str(size.global_batch_size),
                         "--steps", str(size.benchmark_steps), "--warmup-steps", str(size.warmup_steps))
    return command, lambda report: {"tokens_per_sec_ratio_ours_over_trl": report["tokens_per_sec_ratio_ours_over_trl"],
                                    **{result["trainer"]: result["tokens_per_sec"] for result in report["results"]}}


def _source_scoring(size: Size, out: Path, work: Path) -> tuple[list[str], Callable[[dict], dict]]:
    command = _benchmark("source_scoring", out, work, "--model", size.model, "--precision", "fp32", "bf16",
                         "--rows", str(size.rows), "--prompt-words", str(size.words // 2), "--response-words",
                         str(size.words), "--batch-tokens", str(max(1024, 8 * size.words)), "--repeats", "2")
    return command, lambda report: {result["precision"]: {key: result.get(key) for key in
                                                          ("tokens_per_sec", "mean_abs_delta_logp", "max_abs_delta_logp")}
                                    for result in report["results"]}


# name -> (builder, time cap in seconds on the GPU)
STEPS = {"trainer": (_trainer, 150), "pivot_step": (_pivot_step, 110), "vs_trl": (_vs_trl, 200),
         "source_scoring": (_source_scoring, 110)}


def run_steps(*, size: Size, out: Path, work: Path, budget_seconds: float, caps: bool) -> dict:
    """Every step in order within ``budget_seconds`` (each also within its cap when ``caps``); smoke.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_seconds
    log = out / "smoke.log"
    log.write_text("")
    steps = []
    for name, (build, cap) in STEPS.items():
        left = deadline - time.monotonic()
        record = {"name": name}
        if left < 20:
            steps.append({**record, "status": "skipped: out of time"})
            continue
        started = time.monotonic()
        command, figures = build(size, out, work)
        status, output = _run(command, timeout=min(cap, left) if caps else left)
        record.update(status=status, seconds=round(time.monotonic() - started, 1))
        report_file = out / f"{name}.json"
        if status == "ok":
            try:
                record["figures"] = figures(json.loads(report_file.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as error:
                record["status"] = f"failed: its JSON: {error!r}"
        with log.open("a") as file:
            file.write(f"===== {name}: {status} after {record['seconds']} s\n{output[-20000:]}\n")
        print(f"{name}: {status} after {record['seconds']} s", flush=True)
        steps.append(record)
    return {"benchmark": "smoke", "size": vars(size), "budget_seconds": budget_seconds,
            "source_fingerprint": source_fingerprint(), "steps": steps,
            "ok": all(step.get("status") == "ok" for step in steps)}


def _run(command: list[str], *, timeout: float) -> tuple[str, str]:
    """(status, output) of ``command`` in a session of its own: a step past its time is killed with every process
    it started (torchrun's workers too), so the next step has the GPU to itself."""
    process = subprocess.Popen(command, cwd=REPO, env=_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return "timed out", output
    return ("ok" if process.returncode == 0 else f"failed ({process.returncode})"), output


def _environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PYTHONWARNINGS": "ignore"}


def trainer_run(out: Path, overrides: list[str]) -> None:
    """The trainer step: the entry point under torchrun, its metrics summarised into ``out``."""
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")))
    metrics = common.run_training(nproc=1, overrides=overrides, run_dir=run_dir)
    steady = common.steady_state(metrics, warmup_steps=min(2, len(metrics) - 1))
    common.write_json(out, {"benchmark": "trainer", "overrides": overrides, "steps": len(metrics),
                            "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"], **steady,
                            "metrics": metrics})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the JSON results and smoke.log (required)")
    parser.add_argument("--workdir", type=Path, default=None, help="work files (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU rehearsal: tiny shape, gloo, fp32")
    parser.add_argument("--budget-seconds", type=float, default=480, help="all steps together (default 480)")
    parser.add_argument("--fingerprint", action="store_true", help="print this checkout's source fingerprint")
    parser.add_argument("--trainer-run", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.fingerprint:
        print(source_fingerprint())
        return
    if args.trainer_run:
        trainer_run(args.trainer_run, [o for o in rest if o != "--"])
        return
    if args.out is None:
        parser.error("--out is required")
    with tempfile.TemporaryDirectory(prefix="smoke-") as scratch:
        work = args.workdir or Path(scratch)
        report = run_steps(size=DRY_RUN if args.dry_run else GPU, out=args.out, work=work,
                           budget_seconds=args.budget_seconds, caps=not args.dry_run)
    common.write_json(args.out / "smoke.json", report)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
