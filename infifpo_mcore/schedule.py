"""Megatron-Core's pipeline schedule as the trainer runs it: a step's micro-batches forward and backward, forward-only
passes over a whole split in chunks (pivot-init scoring, evaluation), and what the last pipeline stage computed
brought to the ranks that need it.

Schedule contract: ``forward_step(data_iterator, model) -> (output, loss_func)`` (``train_step``); the pipeline's
p2p shapes come from the micro-batches themselves (``[sequences, seq_length]`` tokens, or ``[1, length]`` packed,
one shape per call).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from infifpo_mcore.data import PreferenceBatch
from infifpo_mcore.parallel import ParallelContext
from infifpo_mcore.train_step import UNITS, PER_ROW_KEYS


def run_schedule(*, model_chunks, forward_step: Callable, batches: list[PreferenceBatch],
                 forward_only: bool) -> list[dict]:
    """The schedule over ``batches``; the last stage's loss outputs, one dict per micro-batch ([] elsewhere).

    Several ``model_chunks`` (a virtual pipeline) take Megatron's interleaved schedule, which calls every chunk's
    ``forward_step`` on every micro-batch, each through its own iterator: one over the same ``batches`` per chunk.
    It wants the micro-batches in whole groups of PP."""
    sequences, seq_length = batches[0]["tokens"].shape
    interleaved = len(model_chunks) > 1
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in model_chunks] if interleaved else iter(batches),
        model=model_chunks if interleaved else model_chunks[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=sequences,  # Megatron's micro-batch is our sequences: rows x responses per row, or 1 row packed
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


def forward_only_rows(*, model_chunks, forward_step: Callable, num_rows: int,
                      micro_batches_of: Callable[[list[int]], list[PreferenceBatch]], rows_per_pass: int,
                      row_multiple: int, ctx: ParallelContext) -> dict[str, torch.Tensor] | None:
    """Every row ``0 .. num_rows-1`` once through the pipeline, forward-only; the per-row outputs (each ``[B]``,
    with ``row_ids``) gathered on the last stage into ``{name: [num_rows]}`` in row order. Other stages: None.

    Rows are dealt round-robin over data-parallel ranks, each share padded by repeating its last row to the same
    length on every rank, a multiple of ``row_multiple`` (whole unpacked micro-batches; duplicates give the same
    value). The schedule runs ``rows_per_pass`` rows at a time (a training step's worth, ``micro_batches_of``
    splitting them as a step's), so a split of any size needs the memory of one pass.
    """
    size, rank = ctx.data, ctx.data_rank
    per_rank = math.ceil(math.ceil(num_rows / size) / row_multiple) * row_multiple
    mine = list(range(rank, num_rows, size)) or [0]
    mine += [mine[-1]] * (per_rank - len(mine))
    table: dict[str, torch.Tensor] | None = None
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            for start in range(0, per_rank, rows_per_pass):
                batches = micro_batches_of(mine[start:start + rows_per_pass])
                outputs = run_schedule(model_chunks=model_chunks, forward_step=forward_step, batches=batches,
                                       forward_only=True)
                if ctx.is_last_stage:
                    table = _gather_rows(outputs, into=table, num_rows=num_rows, data=size)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return table


def _gather_rows(outputs: list[dict], *, into: dict[str, torch.Tensor] | None, num_rows: int,
                 data: int) -> dict[str, torch.Tensor]:
    """Last stage: this pass's per-row outputs of every data-parallel rank, written at their rows of ``into``."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=False)
    gathered = {}
    for key in outputs[0]:
        local = torch.cat([out[key] for out in outputs])
        parts = [torch.empty_like(local) for _ in range(data)]
        dist.all_gather(parts, local, group=group)
        gathered[key] = torch.cat(parts).cpu()
    rows = gathered.pop("row_ids")
    into = into if into is not None else {key: torch.zeros(num_rows, dtype=values.dtype)
                                          for key, values in gathered.items()}
    for key, values in gathered.items():
        into[key][rows] = values
    return into


def from_last_stage(value):
    """The last pipeline stage's ``value`` (any picklable), on every stage of its pipeline (rank 0, which logs, sits
    on the first)."""
    box = [value]
    dist.broadcast_object_list(
        box,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return box[0]


def max_over_training_ranks(values: torch.Tensor) -> None:
    """In place: the element-wise max over every training rank (model-parallel group, then data-parallel replicas)."""
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=parallel_state.get_model_parallel_group())
    data_parallel = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=data_parallel)


def mean_metrics(outputs: list[dict], *, ctx: ParallelContext) -> dict[str, float]:
    """A step's metrics on every rank, per-unit means over the global batch (per pair, or per response token for SFT:
    ``train_step.UNITS``): on the last stage each metric's sum over its micro-batches (each a sum over its units) and
    the unit count, summed over data-parallel ranks, divided; then sent down the pipeline."""
    metrics = None
    if ctx.is_last_stage:
        names = sorted(name for name in outputs[0] if name not in (*PER_ROW_KEYS, UNITS))
        sums = [torch.stack([out[name].double() for out in outputs]).sum() for name in names]
        local = torch.stack([*sums, torch.stack([out[UNITS].double() for out in outputs]).sum()])
        dist.all_reduce(local, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
        metrics = dict(zip(names, (local[:-1] / local[-1]).tolist()))
    return from_last_stage(metrics)
