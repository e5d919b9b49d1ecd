"""``forward_step`` for Megatron-Core's pipeline schedule, and the loss on the last pipeline stage.

Schedule contract: ``forward_step(data_iterator, model) -> (output, loss_func)``. Every stage runs the model; only the
last stage's output (vocab-sharded logits) reaches ``loss_func``, which turns it into response log-probs, adds the
reference scores the batch carries (``batch["reference"]``, joined by ``references``) and applies the pure loss
from ``losses``.

Loss scaling, Megatron-Core's per-token loss contract: the training ``loss_func`` returns ``(sum of its
micro-batch's losses, number of units, metrics)``, and the pivot's TransformerConfig sets ``calculate_per_token_loss``
(``model.build_transformer_config``). The unit is the pair for a preference loss, the response token for a
token-level loss (SFT: the loss is the sum of the micro-batch's response-token NLLs). The schedule then neither
divides by the number of micro-batches nor DDP by the data-parallel size; it adds up the unit counts, and
``finalize_model_grads`` broadcasts the total from the last stage, all-reduces it over data-parallel ranks and scales
the gradients by 1 / total. The gradient is that of the mean per-pair loss over the global batch, or for SFT of the
mean NLL per response token of the global batch (Megatron-LM's and TRL's averaging, not a mean of per-row means),
however many pairs each micro-batch holds (packed micro-batches hold different numbers: ``packing``) and however the
batch is split over micro-batches and data-parallel ranks. The metrics travel the same way: sums over the
micro-batch's units plus ``UNITS``, their count; ``schedule.mean_metrics`` divides the global sums by the global
count.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Iterator

import torch
from torch import Tensor

from infifpo_mcore import losses
from infifpo_mcore.attention import packed_seq_params
from infifpo_mcore.config import LossConfig
from infifpo_mcore.data import RESPONSES, PreferenceBatch
from infifpo_mcore.logprobs import (response_positions, response_sequence_hits, response_sequence_logps,
                                    split_responses)
from infifpo_mcore.model import set_response_positions, uses_thd_attention

# Per-row entries of the training loss output (the bad-step guard names rows with them) and the micro-batch's unit
# count (pairs, or response tokens for SFT); metrics are the other keys, each a sum over the micro-batch's units.
ROW_IDS = "row_ids"
ROW_LOSSES = "row_losses"
UNITS = "units"
PER_ROW_KEYS = (ROW_IDS, ROW_LOSSES)
TOKEN_HITS = "token_hits"  # evaluation rows of a token-level loss: response tokens the pivot predicts


def _run_model(model: torch.nn.Module, batch: PreferenceBatch) -> Tensor:
    set_response_positions(model, response_positions(batch["loss_mask"]))
    # attention_mask=None: the layer spec applies the causal mask (unpacked; right padding is masked out of the loss
    # instead), or the packed layout's documents (packing).
    packed = packed_seq_params(batch, thd=uses_thd_attention(model)) if "documents" in batch else None
    return model(batch["tokens"], batch["position_ids"], None, packed_seq_params=packed)


def _response_logps(logits: Tensor, batch: PreferenceBatch) -> dict[str, tuple[Tensor, Tensor]]:
    """{response name: (sums [B], lengths [B])} for the responses the batch stacks (``data.RESPONSES`` order)."""
    sums, lengths = response_sequence_logps(logits=logits, labels=batch["labels"], loss_mask=batch["loss_mask"],
                                            slots=batch.get("response_slots"))
    groups = sums.shape[0] // batch["row_ids"].shape[0]
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
    return response_sequence_hits(logits=logits, labels=batch["labels"], loss_mask=batch["loss_mask"],
                                  slots=batch.get("response_slots"))


def training_loss(logits: Tensor, *, batch: PreferenceBatch, loss: LossConfig,
                  wrpo_alpha: float) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Last stage: response ``logits [1, n, V/TP]`` -> (sum of the micro-batch's losses, its unit count, reported),
    the per-token loss contract of the module docstring: the B rows' losses and B for a preference loss, the response
    tokens' NLLs and their count for a token-level loss (SFT). ``reported``: the loss and every metric summed over
    the units, ``UNITS``, and ``PER_ROW_KEYS``: the rows' dataset indices and losses ``[B]``; SFT reports its loss
    and ``token_accuracy`` (the response tokens the pivot predicts), both per response token. ``wrpo_alpha``: WRPO's
    current alpha."""
    token_level = losses.loss_spec(loss.type).token_level
    hits = _hits(logits, batch) if token_level else None
    responses = _response_logps(logits, batch)
    row_losses, row_metrics = loss_rows(responses, batch, loss, wrpo_alpha)
    total = row_losses.sum()
    if token_level:
        units = responses["chosen"][1].sum().to(torch.int)
        reported = {"loss": total.detach().clone(), UNITS: units, "token_accuracy": hits.sum()}
    else:
        units = torch.tensor(row_losses.shape[0], dtype=torch.int, device=logits.device)
        reported = {"loss": total.detach().clone(), UNITS: units}
        reported.update({name: value.detach().float().sum() for name, value in row_metrics.items()})
    reported.update({ROW_IDS: batch["row_ids"], ROW_LOSSES: row_losses.detach()})
    return total, units, reported


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


def training_forward_step(loss: LossConfig, *, wrpo_alpha: float) -> Callable:
    return _forward_step_with(training_loss, loss=loss, wrpo_alpha=wrpo_alpha)


def evaluation_forward_step(loss: LossConfig, *, wrpo_alpha: float) -> Callable:
    return _forward_step_with(evaluation_rows, loss=loss, wrpo_alpha=wrpo_alpha)


scoring_forward_step = _forward_step_with(sequence_scores)
