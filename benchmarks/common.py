"""What every benchmark shares: model shapes, synthetic preference data, running the real entry point, steady-state
statistics of its metrics.jsonl, the environment record, the printed table and the JSON file.

The benchmarks measure the product's own code paths (``launch/pretrain_infifpo.py`` under torchrun, ``SourceScorer``);
nothing here re-implements training or scoring.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "launch" / "pretrain_infifpo.py"
# The pivot's tokenizer in every benchmark (a real 32k sentencepiece vocabulary shipped in mistral-common); a model
# shape with a larger vocabulary keeps its own vocab_size (the embedding rows past 32k are simply never looked up).
PIVOT_TOKENIZER = ["tokenizer.type=sentencepiece", "tokenizer.path=pkg://mistral_common/data/tokenizer.model.v1"]
SOURCE_TOKENIZER = {"type": "sentencepiece", "path": "pkg://mistral_common/data/tokenizer.model.v1",
                    "chat_template": "plain"}
TIME_KEYS = ("time/data", "time/forward_backward", "time/optimizer")


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped decoder (RMSNorm, SwiGLU, RoPE, GQA), as our pivot (model.* keys) or a transformers Llama."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool = True

    def overrides(self) -> list[str]:
        """The pivot's model.* config overrides for this shape."""
        return [f"model.{key}={value}" for key, value in asdict(self).items()]

    def hf_config(self, *, max_positions: int):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.ffn_hidden_size, num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_query_groups,
                           max_position_embeddings=max_positions, tie_word_embeddings=self.tie_embeddings,
                           rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


SHAPES = {
    # CPU proof runs: seconds per step on 2 cores
    "tiny": ModelShape(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=176,
                       vocab_size=32000),
    # CPU, where per-token compute rather than the vocabulary's fixed costs should dominate: about a second per step
    "small": ModelShape(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=704,
                        vocab_size=32000),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": ModelShape(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                               ffn_hidden_size=1536, vocab_size=49152),
    # meta-llama/Llama-3.2-1B (1.24 B parameters)
    "llama-1b": ModelShape(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                           ffn_hidden_size=8192, vocab_size=128256),
    # meta-llama/Llama-3.2-3B (3.2 B parameters)
    "llama-3b": ModelShape(num_layers=28, hidden_size=3072, num_attention_heads=24, num_query_groups=8,
                           ffn_hidden_size=8192, vocab_size=128256),
}


def save_random_hf_model(shape: ModelShape, directory: Path, *, max_positions: int, seed: int = 0) -> Path:
    """A randomly initialised transformers Llama of ``shape`` saved to ``directory`` (fp32 safetensors)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(shape.hf_config(max_positions=max_positions)).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic preference data
_WORDS = ("the of and to in is was for on that with as by at from his her they this which are had have not but "
          "what all were when we there can an your more one would their if about out up them some so into time has "
          "two like other see could first water been call who oil its now find long down day did get come made may "
          "part over new sound take only little work know place year live back give most very after thing our just "
          "name good sentence man think say great where help through much before line right too mean old any same "
          "tell boy follow came want show also around form three small set put end does another well large must big "
          "even such because turn here why ask went men read need land different home us move try kind hand picture "
          "again change off play spell air away animal house point page letter mother answer found study still learn "
          "should world high every near add food between own below country plant last school father keep tree never "
          "start city earth eye light thought head under story saw left few while along might close something seem "
          "next hard open example begin life always those both paper together got group often run important until").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _fitting_words(tokenizer, *, prompt: str, words: list[str], tokens: int) -> list[str]:
    """The longest prefix of ``words`` whose response tokens fit after the prompt's in ``tokens``."""
    room = tokens - len(tokenizer.encode_prompt([{"role": "user", "content": prompt}]))
    low, high = 0, len(words)  # binary search: a longer prefix never has fewer tokens
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer.encode_response(" ".join(words[:middle]))) <= room:
            low = middle
        else:
            high = middle - 1
    if low == 0:
        raise ValueError(f"a prompt of {tokens - room} tokens leaves no room for a response in {tokens}")
    return words[:low]


def write_preference_data(path: Path, *, rows: int, prompt_words: int, response_words: int, num_sources: int = 0,
                          seed: int = 0, fill_tokens: int | None = None) -> Path:
    """``rows`` TRL-style rows of random common English words, with cached pivot-init scores (``ref_*``) and, when
    ``num_sources`` > 0, cached source scores (``fuse_*``), so that no run scores anything before its first step.

    ``fill_tokens`` (the run's ``model.seq_length``): each response is cut to the words whose tokens fit after the
    prompt, as the trainer tokenises them (``PIVOT_TOKENIZER``, plain template; the words are mostly one token each,
    so give ``response_words`` >= ``fill_tokens``). Every sequence then fills the sequence length within a token or
    two (real tokens ~ padded tokens: tokens/s means compute) while no response is cut by the trainer, which refuses
    that where cached scores describe the whole response. Scores are plausible random log-probs (about -1 to -3 nat
    per word); they steer the loss, not the speed.
    """
    rng = random.Random(seed)
    tokenizer = None
    if fill_tokens is not None:
        from infifpo_mcore.tokenization import build_tokenizer

        settings = dict(override.removeprefix("tokenizer.").split("=", 1) for override in PIVOT_TOKENIZER)
        tokenizer = build_tokenizer(**settings, chat_template="plain")

    def scores(count: int) -> tuple[float, float]:
        total = -sum(rng.uniform(1.0, 3.0) for _ in range(count))
        return total, total / count

    def response(prompt: str) -> str:
        words = [rng.choice(_WORDS) for _ in range(response_words)]
        if tokenizer is not None:
            words = _fitting_words(tokenizer, prompt=prompt, words=words, tokens=fill_tokens)
        return " ".join(words)

    with path.open("w", encoding="utf-8") as file:
        for index in range(rows):
            prompt = _text(rng, prompt_words)
            row = {"id": f"row{index}", "prompt": prompt, "chosen": response(prompt), "rejected": response(prompt)}
            for kind in ("chosen", "rejected"):
                (row[f"ref_{kind}_logps"], row[f"ref_mean_{kind}_logps"]) = scores(len(row[kind].split()))
            if num_sources:
                chosen = [scores(len(row["chosen"].split())) for _ in range(num_sources)]
                rejected = [scores(len(row["rejected"].split())) for _ in range(num_sources)]
                row["fuse_chosen_logps"], row["fuse_mean_chosen_logps"] = map(list, zip(*chosen))
                row["fuse_rejected_logps"], row["fuse_mean_rejected_logps"] = map(list, zip(*rejected))
            file.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Running the real entry point
def training_overrides(*, shape: ModelShape, data: Path, run_dir: Path, seq_length: int, micro_batch_size: int,
                       global_batch_size: int, steps: int, precision: str) -> list[str]:
    """Overrides shared by every benchmark run: one shape, cached-score data, no evaluation, no checkpoint."""
    return [*shape.overrides(), *PIVOT_TOKENIZER, "tokenizer.chat_template=plain", f"model.seq_length={seq_length}",
            "parallel.tensor=1", "parallel.pipeline=1", f"data.path={data}", "data.eval_path=null",
            f"train.micro_batch_size={micro_batch_size}", f"train.global_batch_size={global_batch_size}",
            f"train.steps={steps}", "train.warmup_steps=1", "train.eval_interval=null",
            f"train.precision={precision}", "checkpoint.save=null", f"run_dir={run_dir}"]


def run_training(*, nproc: int, overrides: list[str], run_dir: Path, timeout: int = 3600) -> list[dict]:
    """``launch/pretrain_infifpo.py`` under torchrun with ``overrides`` (run_dir must be among them); returns the
    lines of its metrics.jsonl. Raises RuntimeError with the output's tail when the run fails."""
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)  # the trainer appends
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ENTRY), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-6000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def steady_state(metrics: list[dict], *, warmup_steps: int) -> dict[str, float]:
    """Medians over the steps after ``warmup_steps``: step time (data + forward/backward + optimizer, with its spread)
    and its parts,
    tokens/s, MFU where the trainer reports it, and the most GPU memory in use (NVML) over all steps."""
    measured = metrics[warmup_steps:]
    if not measured:
        raise ValueError(f"no steps after the {warmup_steps} warm-up step(s): raise --steps")
    step_seconds = [sum(step[key] for key in TIME_KEYS) for step in measured]
    summary = {"step_seconds": statistics.median(step_seconds),
               "step_seconds_stdev": statistics.stdev(step_seconds) if len(step_seconds) > 1 else None,
               "tokens_per_sec": statistics.median(step["tokens_per_sec"] for step in measured),
               "measured_steps": len(measured)}
    for key in TIME_KEYS:
        summary[key.replace("/", "_") + "_seconds"] = statistics.median(step[key] for step in measured)
    if all(step.get("mfu") is not None for step in measured):
        summary["mfu"] = statistics.median(step["mfu"] for step in measured)
    memory = [step["gpu/memory_used_gib"] for step in metrics if step.get("gpu/memory_used_gib") is not None]
    if memory:
        summary["peak_gpu_memory_used_gib"] = max(memory)
    return summary


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------------
# Record, table, JSON
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Where and how the figures were taken: device, versions, the command, the date, the commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True)
    except OSError:  # no git (the GPU machine's copy of the tree): the smoke kit records a source fingerprint
        commit = dirty = subprocess.CompletedProcess([], 1, "", "")
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                            f"{os.cpu_count()} cores)",
        "gpu": cuda,
        "absolute_times_meaningful": cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "versions": {name: _version(name) for name in ("megatron-core", "transformers", "transformer-engine",
                                                       "transformer-engine-torch", "trl", "accelerate")},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "git_commit": (commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) or None,
    }


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    cells = [[format_value(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "environment": environment()}, indent=2) + "\n")
    print(f"\nwrote {path}")


def add_output_arguments(parser: argparse.ArgumentParser, *, name: str) -> None:
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / f"{name}.json",
                        help="the JSON result (default: runs/benchmarks/%(prog)s.json)".replace("%(prog)s", name))
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "benchmarks" / name,
                        help="data, models and run directories of this benchmark")


def default_precision() -> str:
    """bf16 on a GPU, fp32 on CPU: the trainer's and the scorer's 'auto'."""
    return "bf16" if torch.cuda.is_available() else "fp32"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")
