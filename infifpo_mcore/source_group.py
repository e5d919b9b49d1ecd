"""Online mode: the source ranks score each global batch with every source model and stream the scores to the last
pipeline stage, which fuses them into the reference, while the pivot trains on the batch before.

Protocol over the bridge (``JobLayout.bridge``, gloo) between the training ranks and the source leader (the first
source rank); T training ranks, M sources, G rows per global batch, E held-out rows:

0. READY      leader -> every training rank, int64 ``[1]``, once every source rank has loaded its models. Every
   training rank waits for it (up to ``sources.timeout_minutes``) before anything else of the stream: none sits
   alone in a training collective, whose timeout (``parallel.timeout_minutes``) may be shorter than the loading.
1. HANDSHAKE  training rank 0 -> leader, int64 ``[1 + T]``: the train-stream rows consumed so far (0, or where a
   resumed run stands), then per training rank 1 if it is on the last pipeline stage (a *receiver*), else 0.
2. EVAL       leader -> each receiver, once: float64 ``[E, 2 + 4M]``, the held-out rows in row order, each as its
   dataset index, its content digest (``row_digest``) and its ``[4, M]`` scores.
3. BATCH      leader -> each receiver, one per step, in step order: float64 ``[G, 2 + 4M]``, the rows of the
   global batch in stream order, each as for EVAL.
4. CONTROL    training rank 0 -> leader, int64 ``[1]``: a grant ``g`` (the batches of steps < g may be sent: the
   trainer will take them), or -1 (stop: training ended, possibly early).

Gloo's send completes only when the receiver has posted the matching receive, so every send is matched by a receive
posted ahead: the receivers post batch b + 1 as soon as batch b arrives, and the leader always has a CONTROL receive
posted. Training rank 0 grants step b + 1 during step b, so the leader sends only batches that will be taken — also
when training stops early, after which the receivers take the one granted batch still in flight and rank 0 sends stop.

Scores of a row under a source (``references.SOURCE_KEYS`` order): chosen log-prob sum, rejected log-prob sum,
chosen and rejected length in that source's tokens — what ``SourceScorer.score`` gives and what the offline scorer
caches.

The two sides agree on the global batches without talking: the source ranks load the data as the trainer does
(``references.load_splits``: the same rows in the same order) and replay the trainer's ``ResumableSampler`` from the
handshake position. The receivers check it: each row's digest must be that of their own row at its index
(``unpack_scores``), and the rows of a batch those their sampler draws (``references.References``); a mismatch
stops the run naming the row, where a silent one would have trained against zero scores.

Placement (``source_assignment``): with S source ranks and M sources, S <= M puts source i on rank i mod S, scoring
every row; S > M puts source r mod M on rank r as one of its replicas, which split each batch's rows. A source with
``tensor_parallel`` is sharded over all S ranks (transformers' tensor-parallel plan over the source group) and scores
every row with all of them; the other sources are placed among themselves by the same rule. Each rank fills its
entries of a zero table (a sharded source's on the first source rank only) and the tables are summed over the source
group (every entry comes from one rank, so the sum is exact); the leader sends the result.

Overlap: the sources score batch b + 1 while the pivot trains on batch b, and its send waits only for its grant. The
wait, if any, shows in the step's ``time/data``.

Faults: a source rank that dies ends the job through torchrun, and the receivers' pending receive fails on the lost
connection (no hang); scores that do not come within ``sources.timeout_minutes`` raise ``SourceGroupError`` naming
the step. Stop signals (SIGTERM, SIGUSR1) are left to the trainers: the source ranks serve on until the stop message.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import timedelta
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from infifpo_mcore.config import InfiFPOConfig
from infifpo_mcore.data import PreferenceDataset, PreferenceRow, ResumableSampler, row_key
from infifpo_mcore.parallel import JobLayout
from infifpo_mcore.preemption import StopRequest
from infifpo_mcore.sources import SourceScorer, build_scorer, prepare_source, report_precision_check

logger = logging.getLogger(__name__)

_READY, _HANDSHAKE, _EVAL, _BATCH, _CONTROL = 5, 1, 2, 3, 4
_ROW_FIELDS = 2  # dataset index, content digest: before a row's scores in EVAL and BATCH


class SourceGroupError(RuntimeError):
    """The source group did not deliver (a rank died or stalled)."""


def _wait(work: dist.Work, *, timeout: timedelta, what: str) -> None:
    try:
        work.wait(timeout)
    except RuntimeError as error:
        raise SourceGroupError(
            f"{what}: not received within sources.timeout_minutes ({timeout}) or a source rank is gone; see the "
            f"source ranks' log (ranks from the first source rank on). Cause: {error}"
        ) from error


def row_digest(row: PreferenceRow) -> float:
    """48 bits of the row's content hash (``data.row_key``), exact in a float64 message."""
    return float(int(row_key(row)[:12], 16))


def _scores_message(indices: list[int], rows: list[PreferenceRow], table: torch.Tensor) -> torch.Tensor:
    """float64 ``[n, 2 + 4M]``: per row its dataset index, its digest and its ``[4, M]`` scores from ``table``."""
    ids = torch.tensor([[float(index), row_digest(row)] for index, row in zip(indices, rows, strict=True)],
                       dtype=torch.float64)
    return torch.cat([ids, table.flatten(1)], dim=1)


def unpack_scores(message: torch.Tensor, *, dataset: PreferenceDataset, path: str, num_sources: int,
                  what: str) -> tuple[list[int], torch.Tensor]:
    """A received EVAL or BATCH message -> (dataset indices, scores ``[n, 4, M]``), each row checked to be the row
    of ``dataset`` at its index (its content digest). Raises SourceGroupError naming the first rows that differ."""
    indices = message[:, 0].long().tolist()
    wrong = [f"dataset row {index} ({path}:{dataset.rows[index].line})" if 0 <= index < len(dataset)
             else f"dataset row {index} (past the {len(dataset)} rows here)"
             for index, digest in zip(indices, message[:, 1].tolist())
             if not (0 <= index < len(dataset) and row_digest(dataset.rows[index]) == digest)]
    if wrong:
        raise SourceGroupError(
            f"{what}: {len(wrong)} row(s) scored by the source ranks are not this run's rows at their index, e.g. "
            f"{', '.join(wrong[:3])}; both sides must load the same data with the same settings")
    return indices, message[:, _ROW_FIELDS:].reshape(-1, 4, num_sources)


# ----------------------------------------------------------------------------------------------------------------------
# Training side
class ScoreReceiver:
    """Training ranks' end of the bridge. Every training rank builds one: the receivers (the last pipeline stage)
    take the scores, training rank 0 sends the handshake, the grants and the stop."""

    def __init__(self, *, job: JobLayout, num_sources: int, is_receiver: bool, timeout: timedelta):
        self.job, self.num_sources, self.is_receiver, self.timeout = job, num_sources, is_receiver, timeout
        self._eval: tuple[torch.Tensor, dist.Work] | None = None
        self._eval_scores: torch.Tensor | None = None
        self._batch: tuple[torch.Tensor, dist.Work] | None = None
        self._end_step = 0
        self._global_batch_size = 0

    def _post_receive(self, shape: tuple[int, ...], tag: int) -> tuple[torch.Tensor, dist.Work]:
        buffer = torch.empty(shape, dtype=torch.float64)
        return buffer, self.job.bridge.recv([buffer], self.job.source_leader, tag)

    def _post_batch(self) -> None:
        self._batch = self._post_receive((self._global_batch_size, _ROW_FIELDS + 4 * self.num_sources), _BATCH)

    def _send_to_leader(self, values: list[int], tag: int, what: str) -> None:
        message = torch.tensor(values, dtype=torch.int64)
        _wait(self.job.bridge.send([message], self.job.source_leader, tag), timeout=self.timeout, what=what)

    def start(self, *, consumed: int, first_step: int, end_step: int, global_batch_size: int,
              eval_rows: int | None) -> None:
        """Collective over the training ranks: wait until the sources are loaded, tell them where training starts,
        post the first receives."""
        ready = self._post_receive((1,), _READY)
        _wait(ready[1], timeout=self.timeout, what="the source ranks loading their models (READY)")
        flags = torch.zeros(self.job.training_ranks, dtype=torch.int64, device=self.job.device)
        flags[self.job.rank] = int(self.is_receiver)
        dist.all_reduce(flags)  # the training side's default group
        self._end_step, self._global_batch_size = end_step, global_batch_size
        if self.job.rank == 0:
            self._send_to_leader([consumed, *flags.tolist()], _HANDSHAKE, "handshake with the source leader")
            if first_step < end_step:
                self._send_to_leader([first_step + 1], _CONTROL, f"grant of step {first_step} to the sources")
        if self.is_receiver:
            if eval_rows:
                self._eval = self._post_receive((eval_rows, _ROW_FIELDS + 4 * self.num_sources), _EVAL)
            if first_step < end_step:
                self._post_batch()

    def eval_scores(self) -> torch.Tensor:
        """The EVAL message (receivers only; waits the first time): see ``unpack_scores``."""
        if self._eval is not None:
            buffer, work = self._eval
            _wait(work, timeout=self.timeout, what="scores of the held-out rows")
            self._eval_scores, self._eval = buffer, None  # a gloo receive is waited for once: a second wait blocks
        return self._eval_scores

    def next_batch(self, *, step: int) -> torch.Tensor | None:
        """The BATCH message of step ``step`` on a receiver (see ``unpack_scores``; None elsewhere); the next
        step's batch is granted and its receive posted."""
        if self.job.rank == 0 and step + 1 < self._end_step:
            self._send_to_leader([step + 2], _CONTROL, f"grant of step {step + 1} to the sources")
        if not self.is_receiver:
            return None
        buffer, work = self._batch
        _wait(work, timeout=self.timeout, what=f"source scores of the global batch of step {step}")
        self._batch = None
        if step + 1 < self._end_step:
            self._post_batch()
        return buffer

    def close(self) -> None:
        """Collective over the training ranks at the end of training (also an early end): the receivers take what
        was granted and is still in flight, then rank 0 tells the sources to stop."""
        if self.is_receiver:
            for pending in (self._eval, self._batch):
                if pending is not None:
                    _wait(pending[1], timeout=self.timeout, what="source scores still in flight at the end")
        dist.barrier()  # the training side's default group: nothing granted is still on its way
        if self.job.rank == 0:
            self._send_to_leader([-1], _CONTROL, "stop message to the source leader")


# ----------------------------------------------------------------------------------------------------------------------
# Source side
def source_assignment(*, num_sources: int, group_size: int,
                      sharded: Sequence[bool] = ()) -> list[list[tuple[int, int, int]]]:
    """Per source rank: the (source index, replica, replicas) it holds, in source order (see the module docstring).
    ``sharded[i]``: source i is tensor-parallel, held by every rank as one replica; the rest are placed among
    themselves."""
    whole = [index for index in range(num_sources) if not (index < len(sharded) and sharded[index])]
    if group_size <= len(whole):
        placement = [[(whole[j], 0, 1) for j in range(rank, len(whole), group_size)] for rank in range(group_size)]
    elif whole:
        replicas = [len(range(j, group_size, len(whole))) for j in range(len(whole))]
        placement = [[(whole[rank % len(whole)], rank // len(whole), replicas[rank % len(whole)])]
                     for rank in range(group_size)]
    else:
        placement = [[] for _ in range(group_size)]
    # Every rank scores its sources in index order: a sharded source's forward, a collective, then starts on all
    # of its ranks without any of them waiting inside another sharded one.
    return [sorted(held + [(index, 0, 1) for index in range(num_sources) if index not in whole])
            for held in placement]


class _HeldSource:
    def __init__(self, *, index: int, replica: int, replicas: int, scorer: SourceScorer, writes: bool):
        self.index, self.replica, self.replicas, self.scorer = index, replica, replicas, scorer
        self.writes = writes  # False on the ranks of a sharded source but its first: one entry per row and source


def _score_table(held: list[_HeldSource], rows: list[PreferenceRow], *, num_sources: int,
                 device: torch.device) -> torch.Tensor:
    """``[len(rows), 4, M]`` float64: this rank's entries filled, then summed over the source group."""
    table = torch.zeros((len(rows), 4, num_sources), dtype=torch.float64)
    for source in held:
        positions = range(source.replica, len(rows), source.replicas)
        scores = source.scorer.score([rows[position] for position in positions])
        if not source.writes:
            continue
        for position, values in zip(positions, scores, strict=True):
            table[position, :, source.index] = torch.tensor(values, dtype=torch.float64)
    table = table.to(device)
    dist.all_reduce(table)  # the source group's default group
    return table.cpu()


def _any_rank(flag: bool, *, device: torch.device) -> bool:
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class _Leader:
    """The first source rank's end of the bridge: reads grants, sends what was granted."""

    def __init__(self, job: JobLayout, timeout: timedelta):
        self.job, self.timeout = job, timeout
        self.receivers: list[int] = []
        self.granted, self.stopped = 0, False
        self.pending: list[dist.Work] = []
        self._post_control()

    def _post_control(self) -> None:
        self.control_buffer = torch.zeros(1, dtype=torch.int64)
        self.control = self.job.bridge.recv([self.control_buffer], 0, _CONTROL)

    def _read_control(self) -> None:
        _wait(self.control, timeout=self.timeout, what="grant or stop from training rank 0")
        value = int(self.control_buffer.item())
        if value < 0:
            self.stopped = True
        else:
            self.granted = value
            self._post_control()

    def may_send(self, step: int) -> bool:
        """Waits until the batch of ``step`` is granted (True) or training stopped (False)."""
        while self.granted <= step and not self.stopped:
            self._read_control()
        return not self.stopped

    def send(self, message: torch.Tensor, tag: int, *, what: str) -> None:
        """Sends to every receiver once the previous sends are taken (they were granted, so they will be)."""
        self.wait_sends()
        self.pending = [self.job.bridge.send([message], receiver, tag) for receiver in self.receivers]
        self.what = what

    def wait_sends(self) -> None:
        for work in self.pending:
            _wait(work, timeout=self.timeout, what=f"the receivers taking {self.what}")
        self.pending = []

    def announce_ready(self, training_ranks: int) -> None:
        message = torch.ones(1, dtype=torch.int64)
        sends = [self.job.bridge.send([message], rank, _READY) for rank in range(training_ranks)]
        for work in sends:
            _wait(work, timeout=self.timeout, what="the training ranks taking READY")

    def finish(self) -> None:
        self.wait_sends()
        while not self.stopped:
            self._read_control()


def serve_sources(cfg: InfiFPOConfig, *, job: JobLayout, train_data: PreferenceDataset,
                  eval_data: PreferenceDataset | None) -> None:
    """A source rank's whole life: load its source models, then score the held-out rows and every remaining global
    batch with the other source ranks, the leader sending each granted batch, until the last or the stop.
    ``train_data``, ``eval_data``: the splits as the trainer loads them (``references.load_splits``)."""
    # A stop signal (preemption, wall time) reaches every worker, but it is the trainers' to act on: they finish the
    # step, save it, take the batch granted and send stop. A source rank dying of it first would fail those receives.
    StopRequest().install()
    group_rank, group_size = job.rank - job.training_ranks, job.world_size - job.training_ranks
    timeout = timedelta(minutes=cfg.sources.timeout_minutes)
    num_sources = len(cfg.sources.models)
    held = []
    sharded = [source.tensor_parallel for source in cfg.sources.models]
    placement = source_assignment(num_sources=num_sources, group_size=group_size, sharded=sharded)[group_rank]
    with tempfile.TemporaryDirectory() as workdir:
        for index, replica, replicas in placement:
            prepared = prepare_source(cfg.sources.models[index], device=job.device, workdir=Path(workdir) / str(index))
            scorer = build_scorer(prepared, device=job.device, batch_tokens=cfg.sources.batch_tokens,
                                  share_prompt=cfg.sources.share_prompt)
            held.append(_HeldSource(index=index, replica=replica, replicas=replicas, scorer=scorer,
                                    writes=group_rank == 0 or not sharded[index]))
            if replica == 0 and held[-1].writes:  # once per source (an FP8 one: its |delta log-prob| vs bf16)
                report_precision_check(scorer, train_data.rows[:cfg.sources.precision_check_rows])
    logger.info("source rank %d holds %s", group_rank,
                ", ".join(cfg.sources.models[source.index].name for source in held))
    dist.barrier()  # the source group's default group (timeout: sources.timeout_minutes): every source is loaded
    leader = _Leader(job, timeout) if group_rank == 0 else None
    handshake = torch.zeros(1 + job.training_ranks, dtype=torch.int64)
    if leader is not None:
        leader.announce_ready(job.training_ranks)
        _wait(job.bridge.recv([handshake], 0, _HANDSHAKE), timeout=timeout, what="handshake from training rank 0")
        leader.receivers = handshake[1:].nonzero().flatten().tolist()
    handshake = handshake.to(job.device)
    dist.broadcast(handshake, src=0)  # the source group's default group
    consumed = int(handshake[0].item())

    if eval_data is not None:
        table = _score_table(held, eval_data.rows, num_sources=num_sources, device=job.device)
        if leader is not None:
            message = _scores_message(list(range(len(eval_data))), eval_data.rows, table)
            leader.send(message, _EVAL, what="the held-out scores")
    global_batch = cfg.train.global_batch_size
    sampler = ResumableSampler(num_rows=len(train_data), seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    sampler.consumed = consumed
    stream = iter(sampler)
    for step in range(consumed // global_batch, cfg.train.steps):
        indices = [next(stream) for _ in range(global_batch)]
        unique = list(dict.fromkeys(indices))  # an epoch boundary may put a row twice into one batch
        table = _score_table(held, [train_data.rows[i] for i in unique], num_sources=num_sources, device=job.device)
        by_index = dict(zip(unique, table))
        message = _scores_message(indices, [train_data.rows[i] for i in indices],
                                  torch.stack([by_index[i] for i in indices]))
        if _any_rank(leader is not None and not leader.may_send(step), device=job.device):
            break
        if leader is not None:
            leader.send(message, _BATCH, what=f"the scores of step {step}")
    if leader is not None:
        leader.finish()
