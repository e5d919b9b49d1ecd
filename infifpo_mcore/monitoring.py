"""Run monitoring: JSONL + TensorBoard metrics, progress bar, throughput / MFU, NVML GPU stats, end-of-run summary.

Everything here is cheap and rank-agnostic: the caller decides which rank logs (``enabled=`` on rank 0 only).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from infifpo_mcore.losses import LossOptions, loss_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WandbSettings:
    project: str
    run_name: str | None = None  # None: the run directory's name
    config: Mapping[str, Any] | None = None  # the run's resolved configuration, shown with the run


class MetricsLogger:
    """Appends one JSON object per optimizer step to ``<run_dir>/metrics.jsonl`` and the same scalars to TensorBoard
    (and to Weights & Biases when ``wandb`` settings are given).

    Each line is flushed as it is written, so a crash loses nothing already logged. Lines are strict JSON
    (non-finite values are written as ``null``) so jq, pandas and friends read the file. A resumed run appends
    (``run_folder.rewind`` has dropped the lines after its checkpoint's step first).
    TensorBoard events go to ``<run_dir>/tensorboard``; when the ``tensorboard`` package is missing this warns once
    and the JSONL file is still written. ``purge_step``: TensorBoard hides the events of earlier runs in the folder
    from that step on (a resumed run: the step after its checkpoint's). A W&B run keeps its id in
    ``<run_dir>/wandb_run_id``, so a resumed run continues the same W&B run. A disabled logger (non-zero ranks)
    touches no file.
    """

    def __init__(self, *, run_dir: Path, enabled: bool, tensorboard: bool = True,
                 wandb: WandbSettings | None = None, purge_step: int | None = None) -> None:
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._writer = None
        self._wandb_run = None
        if not enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.metrics_path.open("a", encoding="utf-8")
        if tensorboard:
            self._writer = _open_tensorboard(Path(run_dir) / "tensorboard", purge_step=purge_step)
        if wandb is not None:
            self._wandb_run = _open_wandb(wandb, run_dir=Path(run_dir))

    def log(self, *, step: int, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            return
        values = {name: float(value) for name, value in metrics.items()}
        record = {"step": step, **{name: value if math.isfinite(value) else None for name, value in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_eval_rows(*, path: Path, dataset: Sequence[Mapping[str, Any]], rows: Mapping[str, torch.Tensor]) -> None:
    """One JSON line per held-out row, in dataset order: its ``id`` and each per-row evaluation output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {key: values.tolist() for key, values in rows.items()}
    with path.open("w", encoding="utf-8") as out:
        for index in range(len(dataset)):
            entry = {"id": dataset[index]["id"], **{key: values[index] for key, values in columns.items()}}
            out.write(json.dumps(entry) + "\n")


def _open_wandb(settings: WandbSettings, *, run_dir: Path) -> Any:
    """A W&B run in ``run_dir`` (its files under ``run_dir/wandb``); WANDB_MODE=offline works without a network."""
    import wandb

    id_file = run_dir / "wandb_run_id"
    run = wandb.init(project=settings.project, name=settings.run_name or run_dir.resolve().name,
                     id=id_file.read_text().strip() if id_file.is_file() else None, resume="allow",
                     dir=str(run_dir), config=dict(settings.config or {}))
    id_file.write_text(run.id)
    return run


def _open_tensorboard(log_dir: Path, *, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed: TensorBoard logging is off, metrics.jsonl is still written "
                       "(pip install tensorboard to turn it on)")
        return None
    # flush_secs: a crash should lose at most a few seconds of curves, not the default two minutes.
    return SummaryWriter(log_dir=str(log_dir), flush_secs=10, purge_step=purge_step)


class ProgressBar:
    """Progress over optimizer steps on stderr (rank 0's).

    On a terminal: a tqdm bar showing loss, reward accuracy and tokens/s, with log lines printed above it. Elsewhere
    (a log file, a pipe, a batch job) a bar's redraws would pile up on one line, so instead a plain line is logged
    at the first and the last step, every tenth of the run and whenever ``line_seconds`` have passed since the
    previous one: ``step 20/60: loss 0.8933, reward accuracy 0.36, 3,188 tokens/s, 0.48 s/step, 19 s left``.
    ``interactive``: None detects a terminal.
    """

    def __init__(self, *, total: int, enabled: bool, initial: int = 0, interactive: bool | None = None,
                 line_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.enabled, self.total, self.step, self._first = enabled, total, initial, initial
        self._bar = None
        if enabled and self.interactive:
            self._bar = tqdm(total=total, initial=initial, file=sys.stderr, unit="step", dynamic_ncols=True)
        self._clock, self._line_seconds = clock, line_seconds
        self._started = self._last_line = clock()
        self._every = max(1, round(total / 10))

    def update(self, step_metrics: Mapping[str, float]) -> None:
        self.step += 1
        if self._bar is not None:
            postfix = {}
            if "loss" in step_metrics:
                postfix["loss"] = f"{step_metrics['loss']:.4f}"
            if "rewards/accuracies" in step_metrics:
                postfix["acc"] = f"{step_metrics['rewards/accuracies']:.2f}"
            if "tokens_per_sec" in step_metrics:
                postfix["tok/s"] = f"{step_metrics['tokens_per_sec']:,.0f}"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)
            return
        now = self._clock()
        due = (self.step in (self._first + 1, self.total) or self.step % self._every == 0
               or now - self._last_line >= self._line_seconds)
        if self.enabled and due:
            self._last_line = now
            seconds_per_step = (now - self._started) / (self.step - self._first)
            logger.info("%s", self._line(step_metrics, seconds_per_step=seconds_per_step))

    def _line(self, step_metrics: Mapping[str, float], *, seconds_per_step: float) -> str:
        parts = [f"loss {step_metrics['loss']:.4f}"] if "loss" in step_metrics else []
        if "rewards/accuracies" in step_metrics:
            parts.append(f"reward accuracy {step_metrics['rewards/accuracies']:.2f}")
        if "tokens_per_sec" in step_metrics:
            parts.append(f"{step_metrics['tokens_per_sec']:,.0f} tokens/s")
        parts.append(f"{seconds_per_step:.2f} s/step")
        if self.step < self.total:
            parts.append(f"{format_duration(seconds_per_step * (self.total - self.step))} left")
        return f"step {self.step}/{self.total}: " + ", ".join(parts)

    def logging_above(self) -> contextlib.AbstractContextManager:
        """While the bar is shown, log lines are printed above it instead of through it."""
        return logging_redirect_tqdm() if self._bar is not None else contextlib.nullcontext()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_duration(seconds: float) -> str:
    """``42 s``, ``3m 05s``, ``2h 07m``."""
    minutes, whole_seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {whole_seconds:02d}s" if minutes else f"{whole_seconds} s"


class Throughput:
    """Tokens per second per optimizer step and over the run.

    Call ``step(tokens=...)`` once per optimizer step with the tokens that step processed (across all
    data-parallel ranks if you want the global rate); the step's time is measured from the previous call
    (or from construction / ``restart_clock``). Call ``restart_clock`` after pauses that are not training
    (eval, checkpoint save) so they do not count.
    """

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._last = clock()
        self.total_tokens = 0
        self.total_seconds = 0.0

    def restart_clock(self) -> None:
        self._last = self._clock()

    def step(self, *, tokens: int) -> float:
        """Record one step; return that step's tokens/s."""
        now = self._clock()
        seconds, self._last = now - self._last, now
        self.total_tokens += tokens
        self.total_seconds += seconds
        return tokens / seconds if seconds > 0 else 0.0

    @property
    def tokens_per_sec(self) -> float:
        """Mean over every recorded step (total tokens / total step time)."""
        return self.total_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


def gpt_flops_per_token(*, num_layers: int, hidden_size: int, ffn_hidden_size: int, num_attention_heads: int,
                        num_query_groups: int, vocab_size: int, seq_length: int, swiglu: bool,
                        head_dim: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of a GPT decoder, the usual ``6 N + 12 L s a d`` count.

    With L layers, hidden h, FFN width f, a heads of size d (``head_dim``, by default h / a), g query groups (GQA),
    vocab V and sequence length s, the matmul parameters a token goes through are

        N = L * (h * (a + 2 g) * d     QKV projection
                 + a * d * h           attention output projection
                 + m * h * f)          MLP: m = 3 when gated (SwiGLU, GeGLU: gate, up, down), m = 2 otherwise
            + h * V                    output logits (counted even when tied to the embedding)

    A matmul costs 2 FLOPs per parameter per token forward and twice that backward, hence 6 N. Attention
    adds, per layer and token, QK^T (2 s a d) and scores x V (2 s a d) forward, x3 for fwd+bwd: 12 L s a d
    (= 12 L s h when d = h / a). This is the full s x s count (Megatron/PaLM convention), not halved for the causal
    mask nor shortened by a sliding window, and it ignores norms, activations, softmax and the embedding lookup.
    """
    d = head_dim or hidden_size // num_attention_heads
    mlp_matrices = 3 if swiglu else 2
    per_layer_params = (hidden_size * (num_attention_heads + 2 * num_query_groups) * d
                        + num_attention_heads * d * hidden_size + mlp_matrices * hidden_size * ffn_hidden_size)
    matmul_params = num_layers * per_layer_params + hidden_size * vocab_size
    attention_flops = 12 * num_layers * seq_length * num_attention_heads * d
    return 6 * matmul_params + attention_flops


def flops_budget(*, model, vocab_size: int, world_size: int) -> tuple[float, float | None]:
    """Training FLOPs per token of the pivot (``model``: its ``config.ModelConfig``, ``vocab_size`` padded), and the
    job's peak FLOP/s where the GPU is known (None on CPU: no MFU there)."""
    flops_per_token = gpt_flops_per_token(
        num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        vocab_size=vocab_size, seq_length=model.seq_length, head_dim=model.kv_channels,
        swiglu=str(model.activation) in ("swiglu", "geglu_tanh"),  # gated: three MLP matrices
    )
    if not torch.cuda.is_available():
        return flops_per_token, None
    peak = peak_bf16_flops(device_name=torch.cuda.get_device_name())
    return flops_per_token, peak * world_size if peak else None


def mfu(*, flops_per_token: float, tokens_per_sec: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over the peak FLOP/s of the devices that
    produced ``tokens_per_sec`` (per-device peak x device count when the rate is global)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return flops_per_token * tokens_per_sec / peak_flops


# Dense BF16 tensor-core peaks from NVIDIA datasheets, matched in order against torch.cuda.get_device_name().
_PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12),
    ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
)


def peak_bf16_flops(*, device_name: str) -> float | None:
    """Per-device dense BF16 peak FLOP/s for known GPUs (e.g. "NVIDIA H100 80GB HBM3"); None when unknown."""
    return next((peak for marker, peak in _PEAK_BF16_FLOPS if marker in device_name), None)


@functools.cache
def _nvml() -> ModuleType | None:
    """pynvml, initialised once per process; None without nvidia-ml-py or without an NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:  # no driver / no libnvidia-ml: the normal case on a CPU box
        logger.debug("NVML unavailable: %s", error)
        return None
    return pynvml


def gpu_stats(*, device: int | None = None) -> dict[str, float]:
    """Utilisation, memory and power of a CUDA device (default: the current one) via NVML.

    Returns ``{"gpu/utilization_pct", "gpu/memory_used_gib", "gpu/memory_total_gib", "gpu/power_w"}``, leaving
    out any reading the device does not support (e.g. utilisation on a MIG slice), and ``{}`` quietly without a
    GPU, nvidia-ml-py or NVML. The device is found by UUID so CUDA_VISIBLE_DEVICES remapping is respected.
    """
    if not torch.cuda.is_available():
        return {}
    nvml = _nvml()
    if nvml is None:
        return {}
    index = torch.cuda.current_device() if device is None else device
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except nvml.NVMLError:
        return {}
    readings = {
        "gpu/utilization_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "gpu/memory_used_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30,
        "gpu/memory_total_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30,
        "gpu/power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000,  # NVML reports milliwatts
    }
    stats = {}
    for name, read in readings.items():
        try:
            stats[name] = float(read())
        except nvml.NVMLError:
            continue
    return stats


def describe_reference(*, loss_type: str, options: LossOptions, num_sources: int) -> str:
    """The summary's "reference:" text: what the policy was compared against (read from the loss spec)."""
    spec = loss_spec(loss_type)
    if not spec.needs_init_scores(options) and not spec.uses_sources:
        return f"none ({loss_type.upper()}: the chosen responses' NLL per token)"
    if not spec.uses_sources:
        detail = ("the data carries no source scores" if num_sources == 0
                  else f"the {num_sources} source scores in the data are not used")
        return f"pivot init ({loss_type.upper()}) — {detail}"
    applied = spec.options_for(options)
    members = f"{num_sources} source{'' if num_sources == 1 else 's'}"
    if applied.include_pivot_init:
        members += " + pivot init"
    return f"fused from {members} (fusion={applied.fusion})"


@dataclass(frozen=True)
class RunSummary:
    steps_run: int
    loss_first: float | None           # None when no step ran (e.g. resumed at the last step)
    loss_last: float | None
    reward_accuracy: float | None      # mean of "rewards/accuracies" over the last accuracy_window steps
    accuracy_window: int
    tokens_per_sec: float
    wall_seconds: float
    reference: str
    checkpoint_path: str | None
    metrics_path: str | None
    mfu: float | None = None
    eval_loss: float | None = None      # on the held-out split after the last step, when there is one
    eval_accuracy: float | None = None
    accuracy_name: str = "reward accuracy"  # SFT: "token accuracy"
    stopped: str | None = None          # why the run ended before train.steps, e.g. "SIGINT after step 6 of 60"
    resume: str | None = None           # how to continue it


def accuracy_metric(*, token_level: bool) -> tuple[str, str]:
    """The metric a loss's accuracy is logged under and its name for a person: SFT's token accuracy (token-level
    losses), else the reward accuracy of the preference losses."""
    return ("token_accuracy", "token accuracy") if token_level else ("rewards/accuracies", "reward accuracy")


def summarize_run(*, history: Sequence[Mapping[str, float]], accuracy_window: int = 5, tokens_per_sec: float,
                  wall_seconds: float, reference: str, checkpoint_path: str | None, metrics_path: str | None,
                  mfu: float | None = None, eval_metrics: Mapping[str, float] | None = None,
                  stopped: str | None = None, resume: str | None = None) -> RunSummary:
    """Build a RunSummary from the per-step metric dicts of this run (oldest first)."""
    key, name = accuracy_metric(token_level=any("token_accuracy" in step for step in history))
    recent = [step[key] for step in history[-accuracy_window:] if key in step]
    return RunSummary(
        steps_run=len(history),
        loss_first=history[0]["loss"] if history else None,
        loss_last=history[-1]["loss"] if history else None,
        reward_accuracy=sum(recent) / len(recent) if recent else None,
        accuracy_window=len(recent),
        tokens_per_sec=tokens_per_sec, wall_seconds=wall_seconds, reference=reference,
        checkpoint_path=checkpoint_path, metrics_path=metrics_path, mfu=mfu,
        eval_loss=(eval_metrics or {}).get("eval/loss"),
        eval_accuracy=(eval_metrics or {}).get(f"eval/{key}"),
        accuracy_name=name,
        stopped=stopped, resume=resume,
    )


def format_summary(summary: RunSummary) -> str:
    """A plain text block for the end of a run."""
    if summary.loss_first is None or summary.loss_last is None:
        loss = "n/a (no steps run)"
    else:
        loss = f"{summary.loss_first:.4f} -> {summary.loss_last:.4f}"
    accuracy = ("n/a" if summary.reward_accuracy is None
                else f"{summary.reward_accuracy:.3f} (mean of last {summary.accuracy_window} steps)")
    minutes, seconds = divmod(summary.wall_seconds, 60)
    rows = [
        ("steps run", str(summary.steps_run)),
        ("loss", loss),
        (summary.accuracy_name, accuracy),
        *([("held-out", f"loss {summary.eval_loss:.4f}, {summary.accuracy_name} {summary.eval_accuracy:.3f}")]
          if summary.eval_loss is not None and summary.eval_accuracy is not None else []),
        ("tokens/s", f"{summary.tokens_per_sec:,.1f}"),
        *([("MFU", f"{summary.mfu:.1%}")] if summary.mfu is not None else []),
        ("wall time", f"{int(minutes)}m {seconds:04.1f}s"),
        ("reference", summary.reference),
        ("checkpoint", summary.checkpoint_path or "none saved"),
        ("metrics", summary.metrics_path or "not written"),
        *([("resume", summary.resume)] if summary.resume else []),
    ]
    width = max(len(label) for label, _ in rows) + 2
    title = f"run summary (stopped: {summary.stopped})" if summary.stopped else "run summary"
    return "\n".join([title, *(f"  {label + ':':<{width}}" + value.replace("\n", "\n" + " " * (width + 2))
                               for label, value in rows)])
