"""The bad-step guard: an optimizer step whose loss or gradients hold NaN / inf changes nothing.

Megatron's fp32 and bf16 optimizers apply whatever the gradients hold (only fp16's loss scaler looks for inf, and
the grad-norm clip lets NaN through), so one bad batch would turn every weight into NaN. Before each optimizer step
the last pipeline stage checks its micro-batch losses and every rank its gradients; the trainer makes the verdict
common with one all-reduce. A bad step is skipped: no optimizer and no LR-schedule step, its batch counts as
consumed. It is counted, logged with its rows (also to ``<run_dir>/skipped_steps.jsonl``), and after
``train.max_consecutive_bad_steps`` bad steps in a row the run saves (the parameters of the last good step) and
stops with ``TrainingHalted``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from infifpo_mcore.data import PreferenceDataset
from infifpo_mcore.parallel import ParallelContext
from infifpo_mcore.schedule import from_last_stage, max_over_training_ranks
from infifpo_mcore.train_step import ROW_IDS, ROW_LOSSES

logger = logging.getLogger(__name__)


class TrainingHalted(RuntimeError):
    """Too many bad steps in a row; the message says why and where the last good state was saved."""


def losses_are_finite(outputs: list[dict[str, torch.Tensor]]) -> bool:
    """Last stage: every micro-batch loss of the step is finite."""
    return bool(torch.stack([out["loss"].float() for out in outputs]).isfinite().all())


def grads_are_finite(model_chunks) -> bool:
    """This rank's gradients (Megatron DDP's ``main_grad`` buffers, already reduced) are all finite."""
    flags = [torch.isfinite(getattr(p, "main_grad", p.grad)).all()
             for chunk in model_chunks for p in chunk.parameters()
             if getattr(p, "main_grad", p.grad) is not None]
    return bool(torch.stack(flags).all()) if flags else True


def nonfinite_rows(outputs: list[dict[str, torch.Tensor]]) -> tuple[list[int], list[int]]:
    """Last stage: (dataset indices of the rows whose loss is NaN / inf, all rows of this rank's micro-batches)."""
    ids = torch.cat([out[ROW_IDS] for out in outputs]).cpu()
    losses = torch.cat([out[ROW_LOSSES].float() for out in outputs]).cpu()
    return ids[~losses.isfinite()].tolist(), ids.tolist()


def step_verdict(outputs: list[dict[str, torch.Tensor]], *, model_chunks, stop_signum: int,
                 ctx: ParallelContext) -> tuple[str, int]:
    """Agreed by every training rank (one all-reduce): why this step must not update ('' when it may), and the stop
    signal any rank has received (0: none)."""
    loss_bad = ctx.is_last_stage and not losses_are_finite(outputs)
    flags = torch.tensor([loss_bad, not grads_are_finite(model_chunks), stop_signum], dtype=torch.int64,
                         device=ctx.device)
    max_over_training_ranks(flags)
    loss_bad, grads_bad, signum = flags.tolist()
    reasons = [what for what, bad in (("NaN/inf loss", loss_bad), ("NaN/inf gradients", grads_bad)) if bad]
    return " and ".join(reasons), signum


def bad_rows(outputs: list[dict[str, torch.Tensor]], *, dataset: PreferenceDataset, path: str,
             ctx: ParallelContext) -> list[dict]:
    """The rows of a bad step to blame, on every rank: those whose loss is NaN/inf, or when no loss is (the
    gradients are), every row of the step."""
    indices = None
    if ctx.is_last_stage:
        shares = [None] * ctx.data
        group = parallel_state.get_data_parallel_group(with_context_parallel=False)
        dist.all_gather_object(shares, nonfinite_rows(outputs), group=group)
        bad = sorted({row for rows, _ in shares for row in rows})
        indices = bad or sorted({row for _, rows in shares for row in rows})
    return [{"file": path, "line": dataset.rows[index].line, "id": dataset.rows[index].id, "index": index}
            for index in from_last_stage(indices)]


@dataclass
class BadStepLog:
    """Counts bad steps; on the logging rank also writes them (``path``) and warns."""

    max_consecutive: int
    path: Path | None = None
    consecutive: int = 0
    total: int = 0
    last_good_step: int = 0

    def record(self, *, step: int, bad: bool, reason: str = "", rows: list[dict] | None = None) -> None:
        if not bad:
            self.consecutive, self.last_good_step = 0, step
            return
        self.consecutive += 1
        self.total += 1
        if self.path is None:
            return
        logger.warning("step %d skipped (no update): %s; rows %s; %d bad step(s) in a row (the run stops at %d), "
                       "%d in all", step, reason, ", ".join(f"{row['file']}:{row['line']} id={row['id']!r}"
                                                           for row in rows or []),
                       self.consecutive, self.max_consecutive, self.total)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"step": step, "reason": reason, "rows": rows or []}) + "\n")

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def halt_message(self, *, step: int, checkpoint: Path | None) -> str:
        saved = (f"saved at {checkpoint}" if checkpoint else
                 "not saved (checkpoint.save is null)")
        return (f"stopping at step {step}: {self.consecutive} consecutive steps had NaN/inf in the loss or the "
                f"gradients (train.max_consecutive_bad_steps={self.max_consecutive}); no update was applied since "
                f"step {self.last_good_step}, whose parameters and optimizer state are {saved}. The rows of the "
                f"skipped steps are listed in the log" + (f" and in {self.path}" if self.path else ""))
