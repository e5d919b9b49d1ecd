"""The training loop, in Megatron-Core's canonical order.

init distributed -> tokenizer + data -> pivot (GPTModel per stage, DDP) -> distributed optimizer + LR schedule
-> [load checkpoint: resume this run, or start this stage from an SFT run's weights] -> reference scores
(``references``: cached, [pivot-init scored], [streamed by the source ranks])
-> for each step: forward/backward through the pipeline schedule (``schedule``), ``finalize_model_grads``, the
bad-step guard and stop-signal check (one all-reduce), optimizer step, metrics from the last stage to rank 0 ->
[save checkpoint] -> summary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from infifpo_mcore import checkpointing, losses, monitoring, packing, pivot_card, step_guard
from infifpo_mcore.compat import torch_adam
from infifpo_mcore.config import ConfigError, InfiFPOConfig, resolve_distributed_optimizer, resolve_precision, to_dict
from infifpo_mcore.data import PreferenceBatch, ResumableSampler, collate_pairs, report_skipped_rows
from infifpo_mcore.memory import (choose_micro_batch_size, device_memory_bytes, estimate_memory_per_rank,
                                  padded_vocab)
from infifpo_mcore.model import (build_pivot, build_transformer_config, gather_weights, params_dtype,
                                 transformer_engine_attention, transformer_engine_available)
from infifpo_mcore.parallel import ParallelContext, destroy_parallel, init_parallel, join_job
from infifpo_mcore.preemption import StopRequest, deferred, signal_name
from infifpo_mcore.preflight import RunInputs, read_inputs
from infifpo_mcore.references import References
from infifpo_mcore.run_folder import RunStart, prepare_folder, record_config
from infifpo_mcore.schedule import forward_only_rows, from_last_stage, mean_metrics, run_schedule
from infifpo_mcore.source_group import ScoreReceiver, serve_sources
from infifpo_mcore.train_step import (evaluation_forward_step, evaluation_metrics, scoring_forward_step,
                                      training_forward_step)

logger = logging.getLogger(__name__)


def _differences(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


def starts_a_new_stage(saved_state: dict, *, loss_type: str) -> bool:
    """Whether a checkpoint with train state ``saved_state`` starts this run from its weights as a new stage (step
    0, a fresh optimizer, LR schedule and data order, the pivot init being those weights) instead of resuming it:
    the checkpoint of an SFT run loaded by a preference run (the recipe's SFT -> preference step). Any other
    checkpoint with a train state resumes, as do those of runs before the train state named its loss."""
    return saved_state.get("loss_type") == "sft" and loss_type != "sft"


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
    """Holds what one run builds; ``fit`` runs the loop. Every training rank constructs one.

    ``inputs``: the tokenizer and data the entry point's checks read (None: read here); ``start``: how the run
    starts in its folder (None: a new run, from ``checkpoint.load`` if set); ``resume_command``: what the summary
    of a stopped run tells the user to run."""

    def __init__(self, cfg: InfiFPOConfig, ctx: ParallelContext, *, inputs: RunInputs | None = None,
                 start: RunStart | None = None, resume_command: str | None = None):
        self.cfg, self.ctx = cfg, ctx
        self.precision = resolve_precision(cfg.train.precision, device=ctx.device, what="train.precision")
        self.distributed_optimizer = resolve_distributed_optimizer(cfg, data_parallel=ctx.data)
        # a step's (and a forward-only pass's) micro-batches: a multiple of PP under a virtual pipeline, whose
        # interleaved schedule runs them in groups of PP
        self.micro_batch_multiple = ctx.pipeline if cfg.parallel.virtual_pipeline else 1
        self.spec = losses.loss_spec(cfg.loss.type)
        self.run_dir = Path(cfg.run_dir)
        self.resume_command = resume_command
        inputs = inputs or read_inputs(cfg)
        self.tokenizer = inputs.tokenizer
        self.datasets = {"train": inputs.train, **({"eval": inputs.eval} if inputs.eval is not None else {})}
        self.references = References(cfg=cfg, datasets=self.datasets)
        for name, dataset in self.datasets.items():
            if dataset.skipped and ctx.rank == 0:
                report_skipped_rows(dataset=dataset, path=self.references.paths[name], run_dir=self.run_dir)
        self.unpadded_vocab_size = cfg.model.vocab_size or self.tokenizer.vocab_size
        self.vocab_size = padded_vocab(model=cfg.model, vocab_size=self.unpadded_vocab_size, tensor=ctx.tensor)
        self.packing, self.share_prompt, note = packing.resolve_packing(
            packing=cfg.data.packing, share_prompt=cfg.data.share_prompt,
            thd_attention=transformer_engine_attention(cfg.model), sliding_window=cfg.model.sliding_window)
        if note and ctx.rank == 0:
            logger.warning("%s", note)
        if cfg.train.micro_batch_size is None:
            cfg.train.micro_batch_size = self._fitting_micro_batch_size()
        self.card = pivot_card.card_for_run(cfg, vocab_size=self.unpadded_vocab_size)  # saved with checkpoints
        self.transformer_config = build_transformer_config(
            model=cfg.model, tensor=ctx.tensor, pipeline=ctx.pipeline, precision=self.precision,
            recompute=cfg.train.recompute, virtual_pipeline=cfg.parallel.virtual_pipeline)
        self.model = build_pivot(
            model=cfg.model, config=self.transformer_config, vocab_size=self.vocab_size, device=ctx.device,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce, bucket_size=cfg.parallel.ddp_bucket_size,
            distributed_optimizer=self.distributed_optimizer, overlap_param_gather=cfg.parallel.overlap_param_gather)
        self.transformer_config.finalize_model_grads_func = finalize_model_grads
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, precision=self.precision,
                                                         distributed_optimizer=self.distributed_optimizer)
        if ctx.rank == 0:
            logger.info("%s", self._memory_estimate().format())
        if cfg.checkpoint.save:
            checkpointing.prepare_save_root(root=Path(cfg.checkpoint.save), model_chunks=self.model,
                                            data_size=ctx.data, precision=self.precision, device=ctx.device)
        self.stop = StopRequest()
        self.agreed_stop = 0  # the stop signal some rank received, once all ranks agreed on it at a step boundary
        self.bad_steps = step_guard.BadStepLog(max_consecutive=cfg.train.max_consecutive_bad_steps)
        self.saved_step: int | None = None
        self.rows_per_step = cfg.train.global_batch_size // ctx.data  # this rank's pairs of a global batch
        self.step = 0
        self.sampler = ResumableSampler(num_rows=len(inputs.train), seed=cfg.train.seed, dp_rank=ctx.data_rank,
                                        dp_size=ctx.data, shuffle=cfg.data.shuffle)
        # A run folder holding checkpoints resumes from its own newest; checkpoint.load is where a new run starts.
        self.loaded_from = start.resume_from if start is not None and start.resume_from else cfg.checkpoint.load
        if self.loaded_from:
            self._load(Path(self.loaded_from))
        if cfg.loss.type == "infifpo" and cfg.loss.clip and cfg.checkpoint.load is None and ctx.rank == 0:
            # A random init scores every response far below any source (-10 against -2.5 nats per token in the tiny
            # run), so every clipped rejected reference is the init's and reward accuracy stays near 0.
            logger.warning("loss.clip is on but the pivot started from a random init (checkpoint.load is null): "
                           "clipping compares each source with the init's own scores, which only a pretrained pivot "
                           "makes meaningful; load one (checkpoint.load, docs/conversion.md) or set loss.clip=false")
        self.bad_steps.last_good_step = self.step
        self.row_order = iter(self.sampler)
        self.score_receiver = self._start_score_stream() if cfg.sources.num_ranks else None
        for split in self.datasets:
            self._score_pivot_init(split)

    def _pack_budget(self, micro_batch_size: int | None = None) -> int | None:
        """Tokens per packed micro-batch (None: unpacked)."""
        if not self.packing:
            return None
        return packing.token_budget(micro_batch_size=micro_batch_size or self.cfg.train.micro_batch_size,
                                    responses=len(self.spec.responses), seq_length=self.cfg.model.seq_length,
                                    pack_tokens=self.cfg.data.pack_tokens)

    def _memory_estimate(self, micro_batch_size: int | None = None):
        """What each rank should need (heaviest pipeline stage), printed at start so a misfit shows before OOM."""
        return estimate_memory_per_rank(
            model=self.cfg.model, tensor=self.ctx.tensor, pipeline=self.ctx.pipeline, data=self.ctx.data,
            micro_batch_size=micro_batch_size or self.cfg.train.micro_batch_size,
            packed_tokens=self._pack_budget(micro_batch_size),
            responses_per_row=len(self.spec.responses), seq_length=self.cfg.model.seq_length,
            precision=self.precision, distributed_optimizer=self.distributed_optimizer,
            vocab_size=self.unpadded_vocab_size, fused_attention=transformer_engine_available(),
            recompute=str(self.cfg.train.recompute))

    def _fitting_micro_batch_size(self) -> int:
        """``train.micro_batch_size: null``: ``memory.choose_micro_batch_size`` for the smallest device among the
        training ranks (every rank must take the same)."""
        capacity = torch.tensor([device_memory_bytes(self.ctx.device)], dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(capacity, op=dist.ReduceOp.MIN)
        packed_tokens = None
        if self.packing:  # what a step's pairs take packed, on average: the micro-batches a budget gives
            train = self.datasets["train"]
            packed_tokens = sum(packing.pair_tokens(e, share_prompt=self.share_prompt) for e in train) / len(train)
        size, estimate, fits = choose_micro_batch_size(
            estimate=lambda pairs: self._memory_estimate(micro_batch_size=pairs), pipeline=self.ctx.pipeline,
            rows_per_rank=self.cfg.train.global_batch_size // self.ctx.data, capacity_bytes=int(capacity.item()),
            micro_batch_multiple=self.micro_batch_multiple,
            packed=None if packed_tokens is None else (packed_tokens, self._pack_budget))
        if self.ctx.rank == 0:
            (logger.info if fits else logger.warning)(
                "train.micro_batch_size null: %d pair(s) per micro-batch, estimated %.2f GiB of %.2f GiB per rank%s",
                size, estimate.total_bytes / 2**30, capacity.item() / 2**30,
                "" if fits else " (even 1 does not fit: expect out-of-memory; see the estimate below)")
        return size

    def _start_score_stream(self) -> ScoreReceiver:
        """Online mode: wait for the source ranks to be loaded, tell them where training starts; the last stage
        receives the scores (``source_group``), ``references`` checks and keeps them."""
        receiver = ScoreReceiver(job=self.ctx.job, num_sources=self.references.num_sources,
                                 is_receiver=self.ctx.is_last_stage,
                                 timeout=timedelta(minutes=self.cfg.sources.timeout_minutes))
        receiver.start(consumed=self.sampler.consumed, first_step=self.step, end_step=self.cfg.train.steps,
                       global_batch_size=self.cfg.train.global_batch_size,
                       eval_rows=len(self.datasets["eval"]) if "eval" in self.datasets else None)
        self.references.stream_from(receiver)
        return receiver

    def _score_pivot_init(self, split: str) -> None:
        """The pivot-init scores the loss needs and nothing else gives: once, forward-only, by the untrained pivot."""
        unscored = self.references.unscored_responses(split)
        if not unscored:
            return
        if self.step > 0:
            raise ConfigError(f"checkpoint {self.loaded_from} (step {self.step}) has no pivot-init scores "
                              f"for the {split} data of the {', '.join(unscored)} responses and the pivot is no "
                              "longer at its init (add ref_* scores to that data or start from step 0)")
        if self.ctx.rank == 0:
            logger.info("%s data has no pivot-init scores (ref_*) of its %s responses: scoring its %d rows with the "
                        "pivot init, once", split, ", ".join(unscored), len(self.datasets[split]))
        self.references.add_scored(split, self._forward_only(scoring_forward_step, split, with_reference=False))

    # ----------------------------------------------------------------------------------------------------------------
    def _micro_batches(self, rows: list[int], split: str, *, with_reference: bool = True) -> list[PreferenceBatch]:
        """This rank's ``rows`` as micro-batches on its device: ``train.micro_batch_size`` pairs each, or packed
        (``packing``: as many on every data-parallel rank); the last stage's carry their reference columns."""
        dataset, mbs = self.datasets[split], self.cfg.train.micro_batch_size
        examples = [dataset[i] for i in rows]
        if self.packing:
            batches = packing.packed_micro_batches(
                examples, budget=self._pack_budget(), share_prompt=self.share_prompt, pad_id=self.tokenizer.pad_id,
                data_group=parallel_state.get_data_parallel_group(with_context_parallel=False), device=self.ctx.device,
                count_multiple=self.micro_batch_multiple)
        else:
            batches = [collate_pairs(examples[i:i + mbs], seq_length=self.cfg.model.seq_length,
                                     pad_id=self.tokenizer.pad_id) for i in range(0, len(examples), mbs)]
        batches = [{key: value.to(self.ctx.device) for key, value in batch.items()} for batch in batches]
        if with_reference and self.ctx.is_last_stage:  # the only stage that computes the loss
            for batch in batches:
                self.references.join(batch, split, device=self.ctx.device)
        return batches

    def _forward_only(self, forward_step, split: str, *, with_reference: bool) -> dict[str, torch.Tensor] | None:
        return forward_only_rows(
            model_chunks=self.model, forward_step=forward_step, num_rows=len(self.datasets[split]),
            micro_batches_of=lambda rows: self._micro_batches(rows, split, with_reference=with_reference),
            rows_per_pass=self.rows_per_step,
            row_multiple=(1 if self.packing else self.cfg.train.micro_batch_size) * self.micro_batch_multiple,
            ctx=self.ctx)

    def _pair_tokens(self, example) -> int:
        """Real (non-pad) tokens the pivot processes for one row: the prompt with each of its responses (the prompt
        once, plus one token per response, with a shared prompt)."""
        return packing.pair_tokens(example, share_prompt=self.packing and self.share_prompt)

    def _next_global_batch(self) -> tuple[list[PreferenceBatch], int]:
        """This rank's micro-batches of the next global batch, and the global batch's real (non-pad) token count."""
        rows = [next(self.row_order) for _ in range(self.rows_per_step)]
        if self.score_receiver is not None:
            self.references.take_stream_batch(step=self.step, rows=rows, data_rank=self.ctx.data_rank,
                                              data_size=self.ctx.data)
        batches = self._micro_batches(rows, "train")
        tokens = torch.tensor([sum(self._pair_tokens(self.datasets["train"][i]) for i in rows)], dtype=torch.int64,
                              device=self.ctx.device)
        dist.all_reduce(tokens, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
        return batches, int(tokens.item())

    def _forward_backward(self, forward_step, batches: list[PreferenceBatch]) -> list[dict]:
        for chunk in self.model:  # from zero gradients; also resets the overlapped reduce's per-bucket bookkeeping
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return run_schedule(model_chunks=self.model, forward_step=forward_step, batches=batches, forward_only=False)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns the step's metrics (on every rank)."""
        clock = [time.perf_counter()]
        batches, tokens = self._next_global_batch()
        clock.append(time.perf_counter())
        forward_step = training_forward_step(self.cfg.loss, wrpo_alpha=self._wrpo_alpha(self.step))
        outputs = self._forward_backward(forward_step, batches)
        clock.append(time.perf_counter())
        bad_reason, self.agreed_stop = step_guard.step_verdict(outputs, model_chunks=self.model,
                                                               stop_signum=self.stop.signum, ctx=self.ctx)
        self.step += 1
        if bad_reason:  # no update: neither the optimizer nor the LR schedule moves; the batch stays consumed
            rows = step_guard.bad_rows(outputs, dataset=self.datasets["train"], path=self.cfg.data.path, ctx=self.ctx)
            self.bad_steps.record(step=self.step, bad=True, reason=bad_reason, rows=rows)
            lr, update_ok, grad_norm = self.optimizer.param_groups[0]["lr"], False, math.nan
        else:
            self.scheduler.step(increment=1)  # the lr of step k is the schedule's value at k + 1: no lr=0 first step
            lr = self.optimizer.param_groups[0]["lr"]
            update_ok, grad_norm, _ = self.optimizer.step()
            self.bad_steps.record(step=self.step, bad=False)
        clock.append(time.perf_counter())
        metrics = mean_metrics(outputs, ctx=self.ctx)
        metrics.update(lr=lr, grad_norm=float(grad_norm or 0.0), skipped=float(not update_ok), tokens=float(tokens),
                       skipped_steps=float(self.bad_steps.total))
        # This rank's step time: data (incl. waiting for scores) / forward-backward through the pipeline / optimizer.
        metrics.update(zip(("time/data", "time/forward_backward", "time/optimizer"), _differences(clock)))
        return metrics

    def _wrpo_alpha(self, completed: int) -> float:
        """WRPO's alpha for the optimizer step after ``completed`` ones (0 at the first step, as the authors' code
        has it); the other losses ignore it."""
        return losses.wrpo_alpha(target=self.cfg.loss.wrpo_alpha, step=completed, steps=self.cfg.train.steps)

    def evaluate(self) -> dict[str, float]:
        """Loss and metrics of the held-out split, every row counted once; on every rank. Rank 0 says the result."""
        started = time.perf_counter()
        # after step k, evaluate with the alpha step k trained with (before the first step: that of step 1)
        forward_step = evaluation_forward_step(self.cfg.loss, wrpo_alpha=self._wrpo_alpha(max(self.step - 1, 0)))
        rows = self._forward_only(forward_step, "eval", with_reference=True)
        if rows and self.cfg.logging.eval_rows and parallel_state.get_tensor_model_parallel_rank() == 0 \
                and self.ctx.data_rank == 0:
            monitoring.write_eval_rows(path=self.run_dir / "eval_rows" / f"step_{self.step:06d}.jsonl",
                                       dataset=self.datasets["eval"], rows=rows)
        metrics = from_last_stage(evaluation_metrics(rows, token_level=self.spec.token_level) if rows else None)
        if self.ctx.is_logging_rank:
            key, name = monitoring.accuracy_metric(token_level=self.spec.token_level)
            logger.info("step %d: held-out loss %.4f, %s %.3f (%d rows, %.1f s)", self.step, metrics["eval/loss"],
                        name, metrics[f"eval/{key}"], len(self.datasets["eval"]), time.perf_counter() - started)
        return metrics

    # ----------------------------------------------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        saved = checkpointing.resolve_checkpoint(path) / checkpointing.TRAIN_STATE
        saved_state = json.loads(saved.read_text()) if saved.is_file() else {}
        if starts_a_new_stage(saved_state, loss_type=str(self.cfg.loss.type)):
            checkpointing.load_checkpoint(path=path, model_chunks=self.model, vocab_size=self.unpadded_vocab_size)
            self.optimizer.reload_model_params()  # bf16: its fp32 main weights were copied from the built model
            dropped = self.references.drop_cached_init()
            if self.ctx.rank == 0:
                logger.info("loaded the weights of %s, an SFT run's checkpoint (step %d): this %s stage starts from "
                            "them at step 0, with a fresh optimizer, LR schedule and data order, and they are its "
                            "pivot init%s", path, saved_state.get("step", 0), self.cfg.loss.type,
                            f" (the cached ref_* scores of the {' and '.join(dropped)} data describe another model "
                            "and are not used)" if dropped else "")
            return
        state = checkpointing.load_checkpoint(path=path, model_chunks=self.model, optimizer=self.optimizer,
                                              vocab_size=self.unpadded_vocab_size)
        if state:
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            self.scheduler.load_state_dict(state["scheduler"])
        save = self.cfg.checkpoint.save
        if save and checkpointing.resolve_checkpoint(path).parent.resolve() == Path(save).resolve():
            self.saved_step = self.step  # already saved there: a run with no step left has nothing new to save
        self.references.load_state_dict(checkpointing.load_init_scores(path) or {}, where=str(path))
        if self.ctx.rank == 0:
            logger.info("loaded %s (step %d)", path, self.step)

    def _save(self) -> Path:
        """Collective; a stop signal during the save waits for its end (``preemption.deferred``)."""
        started = time.perf_counter()
        self.saved_step = self.step
        gather_weights(self.model)
        holds_scores = (self.ctx.is_last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
                        and self.ctx.data_rank == 0)
        with deferred():
            path = checkpointing.save_checkpoint(
                root=Path(self.cfg.checkpoint.save), step=self.step, model_chunks=self.model,
                optimizer=self.optimizer,
                train_state={"step": self.step, "loss_type": str(self.cfg.loss.type),
                             "sampler": self.sampler.state_dict(),  # every data-parallel rank is at the same position
                             "scheduler": self.scheduler.state_dict(), "has_optimizer": True},
                init_scores=(self.references.state_dict() or None) if holds_scores else None,
                keep_last=self.cfg.checkpoint.keep_last,
                write_extra=lambda directory: pivot_card.write_card(self.card, directory=directory))
        if self.ctx.is_logging_rank:
            logger.info("step %d: saved %s (%.1f s)", self.step, path, time.perf_counter() - started)
        return path

    def _eval_due(self) -> bool:
        interval = self.cfg.train.eval_interval
        return self.step == self.cfg.train.steps or bool(interval and self.step % interval == 0)

    def _announce(self) -> None:
        """Rank 0, before the first step: what the loop will do."""
        cfg, first = self.cfg, self.step + 1
        evaluation = ("no held-out evaluation" if "eval" not in self.datasets else
                      f"held-out evaluation every {cfg.train.eval_interval} steps and after the last"
                      if cfg.train.eval_interval else "held-out evaluation after the last step")
        saves = ("no checkpoints (checkpoint.save is null)" if not cfg.checkpoint.save else
                 f"checkpoints every {cfg.checkpoint.save_interval} steps and at the end to {cfg.checkpoint.save}"
                 if cfg.checkpoint.save_interval else f"a checkpoint at the end to {cfg.checkpoint.save}")
        batching = (f"packed micro-batches of up to {self._pack_budget()} tokens" if self.packing else
                    f"{self.rows_per_step // cfg.train.micro_batch_size} micro-batch(es) of "
                    f"{cfg.train.micro_batch_size}")
        logger.info("training steps %d-%d of %d: %d pairs per step (%d on each of %d data-parallel rank(s), in %s); "
                    "%s; %s; metrics to %s", first, cfg.train.steps, cfg.train.steps, cfg.train.global_batch_size,
                    self.rows_per_step, self.ctx.data, batching, evaluation, saves, self.run_dir / "metrics.jsonl")

    def fit(self) -> monitoring.RunSummary:
        cfg, log_rank = self.cfg, self.ctx.is_logging_rank
        if log_rank:
            record_config(cfg)
            self.bad_steps.path = self.run_dir / "skipped_steps.jsonl"
        wandb = None
        if cfg.logging.wandb_project is not None:
            wandb = monitoring.WandbSettings(project=cfg.logging.wandb_project, run_name=cfg.logging.wandb_run_name,
                                             config=to_dict(cfg))
        # TensorBoard hides what earlier runs in the folder logged after this one's starting step
        metrics_logger = monitoring.MetricsLogger(run_dir=self.run_dir, enabled=log_rank, wandb=wandb,
                                                  purge_step=self.step + 1 if self.step else 0)
        progress = monitoring.ProgressBar(total=cfg.train.steps, enabled=log_rank, initial=self.step)
        throughput = monitoring.Throughput()
        flops_per_token, peak_flops = monitoring.flops_budget(model=cfg.model, vocab_size=self.vocab_size,
                                                              world_size=self.ctx.world_size)
        history: list[dict[str, float]] = []
        checkpoint_path = None
        started = time.perf_counter()
        if log_rank:
            self._announce()
        self.stop.install()
        try:
            with progress.logging_above():
                checkpoint_path = self._loop(history=history, metrics_logger=metrics_logger, progress=progress,
                                             throughput=throughput, flops=(flops_per_token, peak_flops))
            if self.score_receiver is not None:
                self.score_receiver.close()  # after a failure the job ends instead; the sources see the lost link
        finally:
            self.stop.uninstall()
            progress.close()
            metrics_logger.close()
        stopped = resume = None
        if self.agreed_stop:
            stopped = f"{signal_name(self.agreed_stop)} after step {self.step} of {cfg.train.steps}"
            resume = (f"the same command again (run_dir {self.run_dir} continues from step {self.step}):\n"
                      f"{self.resume_command}" if cfg.checkpoint.save else "not possible: checkpoint.save is null")
        summary = monitoring.summarize_run(
            history=history, tokens_per_sec=throughput.tokens_per_sec, wall_seconds=time.perf_counter() - started,
            reference=monitoring.describe_reference(loss_type=str(cfg.loss.type),
                                                    options=losses.loss_options(cfg.loss),
                                                    num_sources=self.references.num_sources),
            checkpoint_path=str(checkpoint_path) if checkpoint_path else None,
            metrics_path=str(metrics_logger.metrics_path), mfu=history[-1].get("mfu") if history else None,
            eval_metrics={k: v for k, v in history[-1].items() if k.startswith("eval/")} if history else {},
            stopped=stopped, resume=resume)
        if log_rank:
            print(monitoring.format_summary(summary), flush=True)
        return summary

    def _loop(self, *, history: list[dict[str, float]], metrics_logger: monitoring.MetricsLogger,
              progress: monitoring.ProgressBar, throughput: monitoring.Throughput,
              flops: tuple[float, float | None]) -> Path | None:
        """The steps up to train.steps or an agreed stop signal; returns the last checkpoint saved."""
        cfg, log_rank = self.cfg, self.ctx.is_logging_rank
        flops_per_token, peak_flops = flops
        checkpoint_path = None
        if "eval" in self.datasets and cfg.train.eval_on_start and self.step == 0:
            metrics_logger.log(step=0, metrics=self.evaluate())
            throughput.restart_clock()
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            metrics["tokens_per_sec"] = throughput.step(tokens=int(metrics.pop("tokens")))
            if peak_flops:
                metrics["mfu"] = monitoring.mfu(flops_per_token=flops_per_token,
                                                tokens_per_sec=metrics["tokens_per_sec"], peak_flops=peak_flops)
            if log_rank:
                metrics.update(monitoring.gpu_stats())  # {} without a GPU
            if "eval" in self.datasets and self._eval_due():
                metrics.update(self.evaluate())
                throughput.restart_clock()
            history.append(metrics)
            metrics_logger.log(step=self.step, metrics=metrics)
            progress.update(metrics)
            if self.bad_steps.exhausted:
                raise step_guard.TrainingHalted(self.bad_steps.halt_message(
                    step=self.step, checkpoint=self._save() if cfg.checkpoint.save else None))
            if self.agreed_stop:
                if log_rank:
                    action = ("saving it and stopping" if cfg.checkpoint.save
                              else "stopping (checkpoint.save is null: not saved)")
                    logger.warning("%s received (by at least one rank): step %d is complete; %s",
                                   signal_name(self.agreed_stop), self.step, action)
                break
            interval = cfg.checkpoint.save_interval
            if cfg.checkpoint.save and interval and self.step % interval == 0 and self.step < cfg.train.steps:
                checkpoint_path = self._save()
                throughput.restart_clock()
        if cfg.checkpoint.save and self.saved_step != self.step:
            checkpoint_path = self._save()
        return checkpoint_path


def train(cfg: InfiFPOConfig, *, start: RunStart, inputs: RunInputs, resume_command: str | None = None
          ) -> monitoring.RunSummary | None:
    """What every process of the job runs once launch/pretrain_infifpo.py's checks have passed (``preflight``):
    the training ranks train, the source ranks serve scores (and return None)."""
    job = join_job(source_ranks=cfg.sources.num_ranks, timeout_minutes=cfg.parallel.timeout_minutes,
                   bridge_timeout=timedelta(minutes=cfg.sources.timeout_minutes))
    try:
        # Every rank has planned its start from the folder as it was; only then does rank 0 change it.
        if job.bridge is not None:
            job.bridge.barrier().wait()
        else:
            dist.barrier()
        if job.rank == 0:
            prepare_folder(start, cfg)
        if job.is_source_rank:
            serve_sources(cfg, job=job, train_data=inputs.train, eval_data=inputs.eval)
            return None
        ctx = init_parallel(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline, seed=cfg.train.seed,
                            timeout_minutes=cfg.parallel.timeout_minutes, job=job,
                            virtual_pipeline=cfg.parallel.virtual_pipeline)
        return Trainer(cfg, ctx, inputs=inputs, start=start, resume_command=resume_command).fit()
    finally:
        destroy_parallel()
