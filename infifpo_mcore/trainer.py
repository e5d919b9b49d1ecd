"""The training loop, in Megatron-Core's canonical order.

init distributed -> tokenizer + data -> pivot (GPTModel per stage, DDP) -> distributed optimizer + LR schedule
-> [load checkpoint] -> [pivot-init scores] -> for each step: forward/backward through the pipeline schedule,
``finalize_model_grads``, the bad-step guard and stop-signal check (one all-reduce), optimizer step, metrics from the
last stage to rank 0 -> [save checkpoint] -> summary.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from infifpo_mcore import checkpointing, losses, monitoring, pivot_card, step_guard
from infifpo_mcore.compat import torch_adam
from infifpo_mcore.config import (
    ConfigError,
    InfiFPOConfig,
    fp8_missing,
    resolve_distributed_optimizer,
    resolve_precision,
    save_config,
    to_dict,
    validate_layout,
)
from infifpo_mcore.data import (PreferenceBatch, PreferenceDataset, ResumableSampler, collate_pairs,
                                load_preference_dataset, report_skipped_rows, responses_of)
from infifpo_mcore.memory import (choose_micro_batch_size, device_memory_bytes, estimate_memory_per_rank,
                                  padded_vocab)
from infifpo_mcore.model import (build_pivot, build_transformer_config, gather_weights, params_dtype,
                                 transformer_engine_available)
from infifpo_mcore.parallel import ParallelContext, destroy_parallel, init_parallel, join_job
from infifpo_mcore.preemption import StopRequest, signal_name
from infifpo_mcore.source_group import SCORE_FIELDS, ScoreReceiver, serve_sources
from infifpo_mcore.tokenization import build_tokenizer
from infifpo_mcore.train_step import (PER_ROW_KEYS, evaluation_forward_step, scoring_forward_step,
                                      training_forward_step)

logger = logging.getLogger(__name__)

# Loss types whose reference is fused from source scores, which the data must then carry.
_FUSED_REFERENCE_LOSSES = ("infifpo", "fpo")


@dataclass
class _Split:
    """A dataset and the pivot-init scores of its rows (None where the data caches them or no loss needs them), and
    in the online mode, on the last stage, the source scores received so far (``[rows, 4, M]``, SCORE_FIELDS order)."""

    name: str
    dataset: PreferenceDataset
    init_scores: dict[str, torch.Tensor] | None = None
    source_scores: torch.Tensor | None = None


def _from_last_stage(metrics: dict[str, float] | None) -> dict[str, float]:
    """The last pipeline stage's metrics, on every stage of its pipeline (rank 0, which logs, sits on the first)."""
    box = [metrics]
    dist.broadcast_object_list(
        box,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return box[0]


def _max_over_training_ranks(values: torch.Tensor) -> None:
    """In place: the element-wise max over every training rank (model-parallel group, then data-parallel replicas)."""
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=parallel_state.get_model_parallel_group())
    data_parallel = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=data_parallel)


def _differences(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


def _row_tokens(example) -> int:
    """Real (non-pad) tokens the pivot processes for one row: prompt + each response (chosen, rejected, and WRPO's
    chosen_pivot)."""
    return sum(len(example["prompt_ids"]) + len(example[f"{name}_ids"]) for name in responses_of(example))


def build_optimizer(cfg: InfiFPOConfig, model_chunks, *, precision: str, distributed_optimizer: bool):
    """Megatron's optimizer over ``model_chunks``: Adam on fp32 main weights (copies of bf16 weights in bf16), its
    state sharded over data-parallel ranks with ``distributed_optimizer`` (which the chunks' DDP must match)."""
    train = cfg.train
    dtype = params_dtype(precision)
    config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        clip_grad=train.grad_clip,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    if distributed_optimizer:
        torch_adam.apply()  # where Megatron falls back to torch's Adam (no TE / Apex): its checkpoint fixes
    optimizer = get_megatron_optimizer(config, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps,
        lr_decay_steps=train.steps,
        lr_decay_style=str(train.lr_schedule),
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


class Trainer:
    """Holds what one run builds; ``fit`` runs the loop. Every training rank constructs one."""

    def __init__(self, cfg: InfiFPOConfig, ctx: ParallelContext):
        self.cfg = cfg
        self.ctx = ctx
        self.precision = resolve_precision(cfg)
        self.distributed_optimizer = resolve_distributed_optimizer(cfg, data_parallel=ctx.data)
        if self.precision == "fp8" and (missing := fp8_missing(ctx.device)):
            raise ConfigError([f"train.precision: fp8 needs an FP8 GPU (Hopper, Ada) with Transformer Engine; here: "
                               f"{'; '.join(missing)}. Use bf16 or auto."])
        self.run_dir = Path(cfg.run_dir)
        self.online_sources = cfg.sources.num_ranks > 0
        self.is_wrpo = str(cfg.loss.type) == "wrpo"
        # Sequences per row in a micro-batch (chosen, rejected, and WRPO's chosen_pivot): the pipeline's p2p shapes.
        self.responses_per_row = 3 if self.is_wrpo else 2
        tokenizer = build_tokenizer(
            type=str(cfg.tokenizer.type), path=cfg.tokenizer.path, chat_template=cfg.tokenizer.chat_template
        )
        self.tokenizer = tokenizer
        self.train_data = _Split("train", self._load_data(cfg.data.path))
        self.eval_data = _Split("eval", self._load_data(cfg.data.eval_path)) if cfg.data.eval_path else None
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({tokenizer.vocab_size}, {cfg.tokenizer.path}): its ids would index past the embedding"
            )
        self.unpadded_vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
        self.vocab_size = padded_vocab(model=cfg.model, vocab_size=self.unpadded_vocab_size, tensor=ctx.tensor)
        if cfg.train.micro_batch_size is None:
            cfg.train.micro_batch_size = self._auto_micro_batch_size()
        self.card = pivot_card.card_for_run(cfg, vocab_size=self.unpadded_vocab_size)  # saved with checkpoints
        self.transformer_config = build_transformer_config(
            model=cfg.model, tensor=ctx.tensor, pipeline=ctx.pipeline, precision=self.precision,
            recompute=cfg.train.recompute, virtual_pipeline=cfg.parallel.virtual_pipeline,
        )
        self.model = build_pivot(
            model=cfg.model, config=self.transformer_config, vocab_size=self.vocab_size, device=ctx.device,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce, bucket_size=cfg.parallel.ddp_bucket_size,
            distributed_optimizer=self.distributed_optimizer, overlap_param_gather=cfg.parallel.overlap_param_gather,
        )
        self.transformer_config.finalize_model_grads_func = finalize_model_grads
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, precision=self.precision,
                                                         distributed_optimizer=self.distributed_optimizer)
        if ctx.rank == 0:
            logger.info("%s", self._memory_estimate().format())
        if cfg.checkpoint.save:
            self._remove_incomplete_saves(Path(cfg.checkpoint.save))
            self._check_checkpoint_space(Path(cfg.checkpoint.save))
        self.stop = StopRequest()
        self.agreed_stop = 0  # the stop signal some rank received, once all ranks agreed on it at a step boundary
        self.bad_steps = step_guard.BadStepLog(max_consecutive=cfg.train.max_consecutive_bad_steps)
        self.saved_step: int | None = None
        self.micro_batches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * ctx.data)
        self.step = 0
        self.sampler = ResumableSampler(
            num_rows=len(self.train_data.dataset), seed=cfg.train.seed, dp_rank=ctx.data_rank, dp_size=ctx.data,
            shuffle=cfg.data.shuffle,
        )
        if cfg.checkpoint.load:
            self._load(Path(cfg.checkpoint.load))
        self.bad_steps.last_good_step = self.step
        self.row_order = iter(self.sampler)
        self.score_receiver = self._start_score_stream() if self.online_sources else None
        for split in (self.train_data, self.eval_data):
            if split is not None and self._needs_init_scores(split):
                split.init_scores = self._score_pivot_init(split)

    # ----------------------------------------------------------------------------------------------------------------
    # Data
    def _load_data(self, path: str) -> PreferenceDataset:
        dataset = load_preference_dataset(
            path=path,
            tokenizer=self.tokenizer,
            seq_length=self.cfg.model.seq_length,
            max_prompt_length=self.cfg.data.max_prompt_length,
            num_sources=len(self.cfg.sources.models) or None,
            skip_invalid=self.cfg.data.skip_invalid_rows,
            chosen_pivot=self.is_wrpo,
        )
        if dataset.skipped and self.ctx.rank == 0:
            report_skipped_rows(dataset=dataset, path=path, run_dir=self.run_dir)
        if self.online_sources and dataset.num_sources:
            raise ConfigError(
                f"{path} carries source scores (fuse_*) and sources.num_ranks={self.cfg.sources.num_ranks} would "
                "score them again online; train from the cached ones with sources.num_ranks=0"
            )
        if str(self.cfg.loss.type) in _FUSED_REFERENCE_LOSSES and dataset.num_sources == 0 and not self.online_sources:
            raise ConfigError(
                f"loss.type={self.cfg.loss.type} needs source scores (fuse_* fields) in {path}, which has none; "
                "score the sources first (launch/score_sources.py) or use loss.type=dpo|ipo"
            )
        return dataset

    @property
    def num_sources(self) -> int:
        return len(self.cfg.sources.models) if self.online_sources else self.train_data.dataset.num_sources

    def _start_score_stream(self) -> ScoreReceiver:
        """Online mode: tell the source group where training starts; the last stage will receive the scores."""
        receiver = ScoreReceiver(job=self.ctx.job, num_sources=self.num_sources, is_receiver=self.ctx.is_last_stage,
                                 timeout=timedelta(minutes=self.cfg.sources.timeout_minutes))
        receiver.start(
            consumed=self.sampler.consumed,
            first_step=self.step,
            end_step=self.cfg.train.steps,
            global_batch_size=self.cfg.train.global_batch_size,
            eval_rows=len(self.eval_data.dataset) if self.eval_data else None,
        )
        if self.ctx.is_last_stage:
            for split in (self.train_data, self.eval_data):
                if split is not None:
                    split.source_scores = torch.zeros((len(split.dataset), 4, self.num_sources), dtype=torch.float64)
        return receiver

    def _memory_estimate(self, micro_batch_size: int | None = None):
        """What each rank should need (heaviest pipeline stage), printed at start so a misfit shows before OOM."""
        return estimate_memory_per_rank(
            model=self.cfg.model, tensor=self.ctx.tensor, pipeline=self.ctx.pipeline, data=self.ctx.data,
            micro_batch_size=micro_batch_size or self.cfg.train.micro_batch_size,
            responses_per_row=self.responses_per_row,
            seq_length=self.cfg.model.seq_length,
            precision=self.precision, distributed_optimizer=self.distributed_optimizer,
            vocab_size=self.unpadded_vocab_size,
            fused_attention=transformer_engine_available(), recompute=str(self.cfg.train.recompute),
        )

    def _auto_micro_batch_size(self) -> int:
        """``train.micro_batch_size: null``: the choice of ``memory.choose_micro_batch_size`` for the smallest device
        among the training ranks (every rank must take the same)."""
        capacity = torch.tensor([device_memory_bytes(self.ctx.device)], dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(capacity, op=dist.ReduceOp.MIN)
        size, estimate, fits = choose_micro_batch_size(
            estimate=lambda pairs: self._memory_estimate(micro_batch_size=pairs), pipeline=self.ctx.pipeline,
            rows_per_rank=self.cfg.train.global_batch_size // self.ctx.data, capacity_bytes=int(capacity.item()))
        if self.ctx.rank == 0:
            report = logger.info if fits else logger.warning
            report("train.micro_batch_size null: %d pair(s) per micro-batch, estimated %.2f GiB of %.2f GiB per rank%s",
                   size, estimate.total_bytes / 2**30, capacity.item() / 2**30,
                   "" if fits else " (even 1 does not fit: expect out-of-memory; see the estimate below)")
        return size

    def _remove_incomplete_saves(self, root: Path) -> None:
        """What a killed save left (never published, never loaded) goes before the first save of this run."""
        if self.ctx.rank == 0:
            for path in checkpointing.remove_incomplete(root):
                logger.warning("removed %s: a save interrupted before it was published", path)
        dist.barrier()

    def _check_checkpoint_space(self, root: Path) -> None:
        local = sum(p.numel() for chunk in self.model for p in chunk.parameters())
        total = torch.tensor([local], dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(total)
        # each data-parallel replica holds the whole model
        checkpointing.check_disk_space(root=root, parameters=int(total.item()) // self.ctx.data,
                                       precision=self.precision)

    def _needs_init_scores(self, split: _Split) -> bool:
        """DPO/IPO/WRPO and InfiFPO's clipping need pivot-init scores; computed once when the data has none cached.
        WRPO scores all three responses itself (the cache has no chosen_pivot scores), ignoring cached ref_*.

        Only an untrained pivot can give them: a run resumed past step 0 must find them in its checkpoint.
        """
        if self.is_wrpo:
            needed = split.init_scores is None or "chosen_pivot_logps" not in split.init_scores
            what = "of the chosen_pivot responses (WRPO)"
        else:
            loss = self.cfg.loss
            needed = not (split.dataset.has_init_logps or split.init_scores is not None) and (
                (loss.clip or loss.include_pivot_init) if str(loss.type) == "infifpo"
                else str(loss.type) in ("dpo", "ipo"))
            what = "(add ref_* scores to that data or start from step 0)"
        if needed and self.step > 0:
            raise ConfigError(
                f"checkpoint {self.cfg.checkpoint.load} (step {self.step}) has no pivot-init scores for the {split.name} "
                f"data {what} and the pivot is no longer at its init"
            )
        return needed

    def _batch(self, indices: list[int], split: _Split | None = None) -> PreferenceBatch:
        split = split or self.train_data
        batch = collate_pairs(
            [split.dataset[i] for i in indices], seq_length=self.cfg.model.seq_length, pad_id=self.tokenizer.pad_id
        )
        rows = torch.as_tensor(indices)
        if split.init_scores is not None:
            for name in responses_of(split.dataset[indices[0]]):
                batch[f"init_{name}_logps"] = split.init_scores[f"{name}_logps"][rows]
        if split.source_scores is not None:
            # float32 like the offline path's cached JSON numbers, so both modes give the same batch
            batch.update(zip(SCORE_FIELDS, split.source_scores[rows].float().unbind(1)))
        return {k: v.to(self.ctx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _run_schedule(self, forward_step, batches: list[PreferenceBatch], *, forward_only: bool) -> list[dict]:
        if not forward_only:  # from zero gradients; also resets the overlapped reduce's per-bucket bookkeeping
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
        interleaved = len(self.model) > 1  # a virtual pipeline: every chunk's forward_step reads each micro-batch
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(batches) for _ in self.model] if interleaved else iter(batches),
            model=self.model if interleaved else self.model[0],
            num_microbatches=len(batches),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.responses_per_row * self.cfg.train.micro_batch_size,  # sequences per micro-batch
            decoder_seq_length=self.cfg.model.seq_length,
            forward_only=forward_only,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Pivot-init reference
    def _forward_only_rows(self, forward_step, split: _Split) -> dict[str, torch.Tensor] | None:
        """Every row of ``split`` once through the pipeline, forward-only; per-row outputs gathered on the last stage.

        Rows are dealt round-robin over data-parallel ranks, each share padded to whole micro-batches by repeating
        its last row; the last-stage ranks all-gather their outputs and keep one entry per row, in row order. Other
        stages return None.
        """
        size, rank, mbs = self.ctx.data, self.ctx.data_rank, self.cfg.train.micro_batch_size
        total = len(split.dataset)
        # the interleaved schedule runs micro-batches in groups of PP
        group = mbs * (self.ctx.pipeline if self.cfg.parallel.virtual_pipeline else 1)
        per_rank = math.ceil(math.ceil(total / size) / group) * group
        mine = list(range(rank, total, size)) or [0]
        mine += [mine[-1]] * (per_rank - len(mine))
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad():
            batches = [self._batch(mine[i : i + mbs], split) for i in range(0, per_rank, mbs)]
            outputs = self._run_schedule(forward_step, batches, forward_only=True)
        for chunk in self.model:
            chunk.train()
        if not self.ctx.is_last_stage:
            return None
        group = parallel_state.get_data_parallel_group(with_context_parallel=False)
        table = {}
        for key in outputs[0]:
            local = torch.cat([out[key] for out in outputs])
            gathered = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(gathered, local, group=group)
            table[key] = torch.cat(gathered).cpu()
        rows = table.pop("row_ids")
        by_row = {}
        for key, values in table.items():
            by_row[key] = torch.zeros(total, dtype=values.dtype)
            by_row[key][rows] = values  # duplicates of a row carry the same value
        return by_row

    def _score_pivot_init(self, split: _Split) -> dict[str, torch.Tensor] | None:
        if self.ctx.rank == 0:
            logger.info(
                "%s data has no pivot-init scores (ref_*): scoring its %d rows with the pivot init, once",
                split.name, len(split.dataset),
            )
        return self._forward_only_rows(scoring_forward_step, split)

    def evaluate(self) -> dict[str, float]:
        """Loss and metrics of the held-out split, every row counted once; on every rank."""
        if self.eval_data.source_scores is not None:
            self.eval_data.source_scores = self.score_receiver.eval_scores()
        # after step k, evaluate with the alpha step k trained with
        forward_step = evaluation_forward_step(self.cfg.loss, wrpo_alpha=self._wrpo_alpha(step=self.step))
        rows = self._forward_only_rows(forward_step, self.eval_data)
        if rows and self.cfg.logging.eval_rows and parallel_state.get_tensor_model_parallel_rank() == 0 \
                and self.ctx.data_rank == 0:
            monitoring.write_eval_rows(path=self.run_dir / "eval_rows" / f"step_{self.step:06d}.jsonl",
                                       dataset=self.eval_data.dataset, rows=rows)
        return _from_last_stage(
            {f"eval/{key}": values.float().mean().item() for key, values in rows.items()} if rows else None
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints
    def _load(self, path: Path) -> None:
        state = checkpointing.load_checkpoint(path=path, model_chunks=self.model, optimizer=self.optimizer,
                                              vocab_size=self.unpadded_vocab_size)
        if state:
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            self.scheduler.load_state_dict(state["scheduler"])
        save = self.cfg.checkpoint.save
        if save and checkpointing.resolve_checkpoint(path).parent.resolve() == Path(save).resolve():
            self.saved_step = self.step  # already saved there: a run with no step left has nothing new to save
        saved = checkpointing.load_init_scores(path) or {}
        for split in (self.train_data, self.eval_data):
            prefix = "" if split is self.train_data else "eval/"
            if split is not None and f"{prefix}chosen_logps" in saved:
                # chosen, rejected and (a WRPO run's) chosen_pivot
                split.init_scores = {key.removeprefix(prefix): value for key, value in saved.items()
                                     if key.startswith(prefix) and "/" not in key.removeprefix(prefix)}
        if self.ctx.rank == 0:
            logger.info("loaded %s (step %d)", path, self.step)

    def _save(self) -> Path:
        self.saved_step = self.step
        gather_weights(self.model)
        init_scores = dict(self.train_data.init_scores or {})
        if self.eval_data is not None and self.eval_data.init_scores is not None:
            init_scores.update({f"eval/{key}": value for key, value in self.eval_data.init_scores.items()})
        writes_scores = (
            bool(init_scores)
            and self.ctx.is_last_stage
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and self.ctx.data_rank == 0
        )
        return checkpointing.save_checkpoint(
            root=Path(self.cfg.checkpoint.save),
            step=self.step,
            model_chunks=self.model,
            optimizer=self.optimizer,
            train_state={
                "step": self.step,
                "sampler": self.sampler.state_dict(),  # every data-parallel rank is at the same position
                "scheduler": self.scheduler.state_dict(),
                "has_optimizer": True,
            },
            init_scores=init_scores if writes_scores else None,
            keep_last=self.cfg.checkpoint.keep_last,
            write_extra=lambda directory: pivot_card.write_card(self.card, directory=directory),
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Steps
    def _next_global_batch(self) -> tuple[list[PreferenceBatch], int]:
        """This rank's micro-batches of the next global batch, and the global batch's real (non-pad) token count."""
        mbs = self.cfg.train.micro_batch_size
        received = self.score_receiver.next_batch(step=self.step) if self.score_receiver else None
        if received is not None:
            rows, scores = received
            self.train_data.source_scores[rows] = scores
        batches, tokens = [], 0
        for _ in range(self.micro_batches):
            indices = [next(self.row_order) for _ in range(mbs)]
            batches.append(self._batch(indices))
            tokens += sum(_row_tokens(self.train_data.dataset[i]) for i in indices)
        total = torch.tensor([tokens], dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
        return batches, int(total.item())

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns the step's metrics (on every rank)."""
        clock = [time.perf_counter()]
        batches, tokens = self._next_global_batch()
        clock.append(time.perf_counter())
        forward_step = training_forward_step(self.cfg.loss, wrpo_alpha=self._wrpo_alpha(step=self.step + 1))
        outputs = self._run_schedule(forward_step, batches, forward_only=False)
        clock.append(time.perf_counter())
        bad_reason, self.agreed_stop = self._step_verdict(outputs)
        self.step += 1
        if bad_reason:  # no update: neither the optimizer nor the LR schedule moves; the batch stays consumed
            self.bad_steps.record(step=self.step, bad=True, reason=bad_reason, rows=self._bad_rows(outputs))
            lr, update_ok, grad_norm = self.optimizer.param_groups[0]["lr"], False, math.nan
        else:
            self.scheduler.step(increment=1)  # the lr of step k is the schedule's value at k + 1: no lr=0 first step
            lr = self.optimizer.param_groups[0]["lr"]
            update_ok, grad_norm, _ = self.optimizer.step()
            self.bad_steps.record(step=self.step, bad=False)
        clock.append(time.perf_counter())
        metrics = self._reduce_metrics(outputs)
        metrics.update(lr=lr, grad_norm=float(grad_norm or 0.0), skipped=float(not update_ok), tokens=float(tokens),
                       skipped_steps=float(self.bad_steps.total))
        # This rank's step time: data (incl. waiting for scores) / forward-backward through the pipeline / optimizer.
        metrics.update(zip(("time/data", "time/forward_backward", "time/optimizer"), _differences(clock)))
        return metrics

    def _wrpo_alpha(self, *, step: int) -> float:
        """WRPO's alpha for optimizer step ``step`` (from 1; 0 for other losses, which ignore it)."""
        if not self.is_wrpo:
            return 0.0
        return losses.wrpo_alpha(target=self.cfg.loss.wrpo_alpha, step=step, steps=self.cfg.train.steps)

    def _step_verdict(self, outputs: list[dict]) -> tuple[str, int]:
        """Agreed by every training rank: why this step must not update ('' when it may), and the stop signal any
        rank has received (0: none)."""
        loss_bad = self.ctx.is_last_stage and not step_guard.losses_are_finite(outputs)
        flags = torch.tensor([loss_bad, not step_guard.grads_are_finite(self.model), self.stop.signum],
                             dtype=torch.int64, device=self.ctx.device)
        _max_over_training_ranks(flags)
        loss_bad, grads_bad, signum = flags.tolist()
        reasons = [what for what, bad in (("NaN/inf loss", loss_bad), ("NaN/inf gradients", grads_bad)) if bad]
        return " and ".join(reasons), signum

    def _bad_rows(self, outputs: list[dict]) -> list[dict]:
        """The rows of a bad step to blame, on every rank: those whose loss is NaN/inf, or when no loss is (the
        gradients are), every row of the step."""
        indices = None
        if self.ctx.is_last_stage:
            shares = [None] * self.ctx.data
            group = parallel_state.get_data_parallel_group(with_context_parallel=False)
            dist.all_gather_object(shares, step_guard.nonfinite_rows(outputs), group=group)
            bad = sorted({row for rows, _ in shares for row in rows})
            indices = bad or sorted({row for _, rows in shares for row in rows})
        rows = self.train_data.dataset.rows
        return [{"file": self.cfg.data.path, "line": rows[index].line, "id": rows[index].id, "index": index}
                for index in _from_last_stage(indices)]

    def _reduce_metrics(self, outputs: list[dict]) -> dict[str, float]:
        """Last stage: mean over micro-batches, then over data-parallel ranks; then sent down the pipeline."""
        metrics = None
        if self.ctx.is_last_stage:
            names = sorted(name for name in outputs[0] if name not in PER_ROW_KEYS)
            local = torch.stack([torch.stack([out[name].float() for out in outputs]).mean() for name in names])
            dist.all_reduce(local, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
            metrics = dict(zip(names, (local / self.ctx.data).tolist()))
        return _from_last_stage(metrics)

    def _flops_budget(self) -> tuple[float, float | None]:
        """Model FLOPs per token, and the job's peak FLOP/s where the GPU is known (no MFU on CPU)."""
        model = self.cfg.model
        flops_per_token = monitoring.gpt_flops_per_token(
            num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size,
            num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
            vocab_size=self.vocab_size, seq_length=model.seq_length, swiglu=str(model.activation) == "swiglu",
        )
        if not torch.cuda.is_available():
            return flops_per_token, None
        peak = monitoring.peak_bf16_flops(device_name=torch.cuda.get_device_name())
        return flops_per_token, peak * self.ctx.world_size if peak else None

    def _log_stop(self) -> None:
        if self.ctx.rank == 0:
            action = ("saving it and stopping" if self.cfg.checkpoint.save
                      else "stopping (checkpoint.save is null: not saved)")
            logger.warning("%s received (by at least one rank): step %d is complete; %s",
                           signal_name(self.agreed_stop), self.step, action)

    def _eval_due(self) -> bool:
        interval = self.cfg.train.eval_interval
        return self.step == self.cfg.train.steps or bool(interval and self.step % interval == 0)

    def fit(self) -> monitoring.RunSummary:
        cfg, ctx = self.cfg, self.ctx
        log_rank = ctx.is_logging_rank
        if log_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, path=self.run_dir / "config.yaml")
        wandb = None
        if cfg.logging.wandb_project is not None:
            wandb = monitoring.WandbSettings(project=cfg.logging.wandb_project, run_name=cfg.logging.wandb_run_name,
                                             config=to_dict(cfg))
        metrics_logger = monitoring.MetricsLogger(run_dir=self.run_dir, enabled=log_rank, wandb=wandb)
        if log_rank:
            self.bad_steps.path = self.run_dir / "skipped_steps.jsonl"
        progress = monitoring.ProgressBar(total=cfg.train.steps, enabled=log_rank, initial=self.step)
        throughput = monitoring.Throughput()
        flops_per_token, peak_flops = self._flops_budget()
        history: list[dict[str, float]] = []
        checkpoint_path = None
        started = time.perf_counter()
        self.stop.install()
        try:
            if self.eval_data is not None and cfg.train.eval_on_start and self.step == 0:
                metrics_logger.log(step=0, metrics=self.evaluate())
                throughput.restart_clock()
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                metrics["tokens_per_sec"] = throughput.step(tokens=int(metrics.pop("tokens")))
                if peak_flops:
                    metrics["mfu"] = monitoring.mfu(
                        flops_per_token=flops_per_token, tokens_per_sec=metrics["tokens_per_sec"], peak_flops=peak_flops
                    )
                if log_rank:
                    metrics.update(monitoring.gpu_stats())  # {} without a GPU
                if self.eval_data is not None and self._eval_due():
                    metrics.update(self.evaluate())
                    throughput.restart_clock()
                history.append(metrics)
                metrics_logger.log(step=self.step, metrics=metrics)
                progress.update(metrics)
                if self.bad_steps.exhausted:
                    raise step_guard.TrainingHalted(self.bad_steps.halt_message(
                        step=self.step, checkpoint=self._save() if cfg.checkpoint.save else None))
                if self.agreed_stop:
                    self._log_stop()
                    break
                interval = cfg.checkpoint.save_interval
                if cfg.checkpoint.save and interval and self.step % interval == 0 and self.step < cfg.train.steps:
                    checkpoint_path = self._save()
                    throughput.restart_clock()
            if cfg.checkpoint.save and self.saved_step != self.step:
                checkpoint_path = self._save()
            if self.score_receiver is not None:
                self.score_receiver.close()  # after a failure the job ends instead; the sources see the lost link
        finally:
            self.stop.uninstall()
            progress.close()
            metrics_logger.close()
        summary = monitoring.summarize_run(
            history=history,
            tokens_per_sec=throughput.tokens_per_sec,
            wall_seconds=time.perf_counter() - started,
            reference=monitoring.describe_reference(
                loss_type=str(cfg.loss.type),
                num_sources=self.num_sources,
                fusion=str(cfg.loss.fusion),
                include_pivot_init=cfg.loss.include_pivot_init,
            ),
            checkpoint_path=str(checkpoint_path) if checkpoint_path else None,
            metrics_path=str(metrics_logger.metrics_path),
            mfu=history[-1].get("mfu") if history else None,
            eval_metrics={k: v for k, v in history[-1].items() if k.startswith("eval/")} if history else {},
        )
        if log_rank:
            print(monitoring.format_summary(summary), flush=True)
        return summary


def train(cfg: InfiFPOConfig) -> monitoring.RunSummary | None:
    """Entry point used by launch/pretrain_infifpo.py: every process of the job calls it (source ranks return None)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Before any process group exists: a clear message, not a hang.
    validate_layout(cfg, world_size=world_size)
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(name)s: %(message)s")
    if int(os.environ.get("RANK", "0")) in (0, world_size - cfg.sources.num_ranks):  # and the source leader
        logging.getLogger("infifpo_mcore").setLevel(logging.INFO)
    job = join_job(source_ranks=cfg.sources.num_ranks, timeout_minutes=cfg.parallel.timeout_minutes,
                   bridge_timeout=timedelta(minutes=cfg.sources.timeout_minutes))
    try:
        if job.is_source_rank:
            serve_sources(cfg, job=job)
            return None
        ctx = init_parallel(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline, seed=cfg.train.seed,
                            timeout_minutes=cfg.parallel.timeout_minutes, job=job,
                            virtual_pipeline=cfg.parallel.virtual_pipeline)
        return Trainer(cfg, ctx).fit()
    finally:
        destroy_parallel()
