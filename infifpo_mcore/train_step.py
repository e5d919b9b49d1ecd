"""``forward_step`` for Megatron-Core's pipeline schedule, and the loss on the last pipeline stage.

Schedule contract: ``forward_step(data_iterator, model) -> (output, loss_func)``. Every stage runs the model; only the
last stage's output (vocab-sharded logits) reaches ``loss_func``, which turns it into response log-probs, adds the
reference scores the batch carries (``batch["reference"]``, joined by ``references``) and applies the pure loss
from ``losses``.

Loss scaling: the schedule divides each micro-batch's loss by the number of micro-batches M and Megatron DDP averages
gradients over the D data-parallel ranks. A preference loss returns the mean over its micro-batch's rows, so the
gradient is that of the mean over the global batch (every micro-batch has the same number of rows). A token-level
loss (SFT) returns its micro-batch's sum of token NLLs times ``token_scale`` = M x D / T, T the response tokens of
the whole global batch (the trainer counts them before the step): the M x D cancel, and the gradient is that of
(sum of token NLLs over the global batch) / T whatever the micro-batching and data parallelism. The same
pre-computed scale serves every Megatron-Core version, unlike the schedule's per-token mode, which also changes the
DDP gradient scaling of every loss.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Iterator

import torch
from torch import Tensor

from infifpo_mcore import losses
from infifpo_mcore.config import LossConfig
from infifpo_mcore.data import RESPONSES, PreferenceBatch
from infifpo_mcore.logprobs import (response_positions, response_sequence_hits, response_sequence_logps,
                                    split_responses)
from infifpo_mcore.model import set_response_positions

# Per-row entries of the training loss output (the bad-step guard names rows with them); metrics are the other keys.
ROW_IDS = "row_ids"
ROW_LOSSES = "row_losses"
PER_ROW_KEYS = (ROW_IDS, ROW_LOSSES)
TOKEN_HITS = "token_hits"  # evaluation rows of a token-level loss: response tokens the pivot predicts


def _run_model(model: torch.nn.Module, batch: PreferenceBatch) -> Tensor:
    set_response_positions(model, response_positions(batch["loss_mask"]))
    # attention_mask=None: the layer spec applies the causal mask; right padding is masked out of the loss instead.
    return model(batch["tokens"], batch["position_ids"], None)


def _response_logps(logits: Tensor, batch: PreferenceBatch) -> dict[str, tuple[Tensor, Tensor]]:
    """{response name: (sums [B], lengths [B])} for the responses the batch stacks (``data.RESPONSES`` order)."""
    sums, lengths = response_sequence_logps(logits=logits, labels=batch["labels"], loss_mask=batch["loss_mask"])
    groups = batch["tokens"].shape[0] // batch["row_ids"].shape[0]
    return dict(zip(RESPONSES[:groups], zip(split_responses(sums, groups=groups),
                                            split_responses(lengths, groups=groups), strict=True)))


def loss_rows(responses: dict[str, tuple[Tensor, Tensor]], batch: PreferenceBatch, loss: LossConfig,
              wrpo_alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-row loss ``[B]`` and metrics of the policy's ``responses`` (``{name: (sums [B], lengths [B])}``, computed
    once per micro-batch: the vocab-parallel log-softmax works on the logits in place, so a second pass over the
    same logits would read garbage) against the batch's reference, with every option of ``loss``."""
    logps: losses.PreferenceLogps = {}
    for name, (sums, lengths) in responses.items():
        logps[f"policy_{name}_logps"], logps[f"policy_{name}_lengths"] = sums, lengths
    logps.update(batch.get("reference", {}))
    options = losses.loss_options(loss, wrpo_alpha=wrpo_alpha)
    return losses.compute_loss(loss_type=str(loss.type), logps=logps, **dataclasses.asdict(options))


def _hits(logits: Tensor, batch: PreferenceBatch) -> Tensor:
    """Per sequence, the response tokens the pivot predicts (argmax); before the log-probs use the logits."""
    return response_sequence_hits(logits=logits, labels=batch["labels"], loss_mask=batch["loss_mask"])


def micro_batch_loss(row_losses: Tensor, *, token_level: bool, token_scale: float) -> Tensor:
    """What a micro-batch returns to the schedule (module docstring): the rows' mean, or for a token-level loss the
    sum of its per-row token sums times ``token_scale``."""
    return row_losses.sum() * token_scale if token_level else row_losses.mean()


def training_loss(logits: Tensor, *, batch: PreferenceBatch, loss: LossConfig, wrpo_alpha: float,
                  token_scale: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Last stage: response ``logits [1, n, V/TP]`` -> (the micro-batch's loss as the module docstring scales it,
    metrics, plus ``PER_ROW_KEYS``: the rows' dataset indices and losses ``[B]``). ``wrpo_alpha``: WRPO's current
    alpha; ``token_scale``: M x D / T, for a token-level loss (SFT), whose ``loss`` and ``token_accuracy`` then
    average to their global-batch values over micro-batches and data-parallel ranks."""
    token_level = losses.loss_spec(loss.type).token_level
    hits = _hits(logits, batch) if token_level else None
    row_losses, row_metrics = loss_rows(_response_logps(logits, batch), batch, loss, wrpo_alpha)
    step_loss = micro_batch_loss(row_losses, token_level=token_level, token_scale=token_scale)
    # Megatron's schedule divides the returned loss by the micro-batch count in place: report a copy.
    reported = {"loss": step_loss.detach().clone()}
    if hits is not None:
        reported["token_accuracy"] = hits.sum() * token_scale
    reported.update({name: value.detach().float().mean() for name, value in row_metrics.items()})
    reported.update({ROW_IDS: batch["row_ids"], ROW_LOSSES: row_losses.detach()})
    return step_loss, reported


def evaluation_rows(logits: Tensor, *, batch: PreferenceBatch, loss: LossConfig,
                    wrpo_alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward-only evaluation: per-row loss and metrics ``[B]`` with their row ids, so duplicates can be dropped;
    also the policy's own log-probs (sums, token counts) and ``policy_margin``, its chosen - rejected per-token
    log-prob: a held-out measure that, unlike the rewards, does not depend on the loss's reference. A token-level
    loss (SFT) has the chosen response alone, and its ``token_hits`` instead of the margin."""
    token_level = losses.loss_spec(loss.type).token_level
    hits = _hits(logits, batch) if token_level else None
    responses = _response_logps(logits, batch)
    row_losses, row_metrics = loss_rows(responses, batch, loss, wrpo_alpha)
    rows = {"row_ids": batch["row_ids"], "loss": row_losses.detach()}
    rows.update({name: value.detach().float() for name, value in row_metrics.items()})
    for name in ("chosen", "rejected"):
        if name not in responses:
            continue
        sums, lengths = responses[name]
        rows[f"policy_{name}_logps"], rows[f"policy_{name}_lengths"] = sums.detach().float(), lengths.float()
    if hits is not None:
        rows[TOKEN_HITS] = hits
    else:
        rows["policy_margin"] = (rows["policy_chosen_logps"] / rows["policy_chosen_lengths"]
                                 - rows["policy_rejected_logps"] / rows["policy_rejected_lengths"])
    return torch.zeros((), device=logits.device), rows


def evaluation_metrics(rows: dict[str, Tensor], *, token_level: bool) -> dict[str, float]:
    """``eval/*`` of a split's per-row evaluation outputs (every row once): row means; for a token-level loss (SFT)
    the loss and token accuracy per response token of the whole split, as training averages them."""
    metrics = {f"eval/{key}": values.float().mean().item() for key, values in rows.items() if key != TOKEN_HITS}
    if token_level:
        tokens = rows["policy_chosen_lengths"].sum()
        metrics["eval/loss"] = (rows["loss"].sum() / tokens).item()
        metrics["eval/token_accuracy"] = (rows[TOKEN_HITS].sum() / tokens).item()
    return metrics


def sequence_scores(logits: Tensor, *, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward-only scoring (pivot init): per-row sums ``{name}_logps`` of every response the batch stacks (chosen,
    rejected, WRPO's chosen_pivot), keyed by row id; no loss."""
    scores = {"row_ids": batch["row_ids"]}
    scores.update({f"{name}_logps": sums.detach() for name, (sums, _) in _response_logps(logits, batch).items()})
    return torch.zeros((), device=logits.device), scores


def _forward_step_with(loss_func: Callable, **loss_kwargs) -> Callable:
    """The schedule's ``forward_step``: run this chunk on the next micro-batch, ``loss_func`` on its last stage."""

    def forward_step(data_iterator: Iterator[PreferenceBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        return _run_model(model, batch), partial(loss_func, batch=batch, **loss_kwargs)

    return forward_step


def training_forward_step(loss: LossConfig, *, wrpo_alpha: float, token_scale: float) -> Callable:
    return _forward_step_with(training_loss, loss=loss, wrpo_alpha=wrpo_alpha, token_scale=token_scale)


def evaluation_forward_step(loss: LossConfig, *, wrpo_alpha: float) -> Callable:
    return _forward_step_with(evaluation_rows, loss=loss, wrpo_alpha=wrpo_alpha)


scoring_forward_step = _forward_step_with(sequence_scores)
