"""``forward_step`` for Megatron-Core's pipeline schedule, and the loss on the last pipeline stage.

Schedule contract: ``forward_step(data_iterator, model) -> (output, loss_func)``. Every stage runs the model; only the
last stage's output (vocab-sharded logits) reaches ``loss_func``, which turns it into response log-probs, adds the
reference scores the batch carries (``batch["reference"]``, joined by ``references``) and applies the pure loss
from ``losses``.

Loss scaling, Megatron-Core's per-token loss contract with the pair as the unit: the training ``loss_func`` returns
``(sum of its micro-batch's per-pair losses, number of pairs, metrics)``, and the pivot's TransformerConfig sets
``calculate_per_token_loss`` (``model.build_transformer_config``). The schedule then neither divides by the number of
micro-batches nor DDP by the data-parallel size; it adds up the pair counts, and ``finalize_model_grads`` broadcasts
the total from the last stage, all-reduces it over data-parallel ranks and scales the gradients by 1 / total. The
gradient is that of the mean per-pair loss over the global batch, however many pairs each micro-batch holds (packed
micro-batches hold different numbers: ``packing``). The metrics travel the same way: sums over the micro-batch's
pairs plus ``PAIRS``, their count; ``schedule.mean_metrics`` divides the global sums by the global count.
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
from infifpo_mcore.logprobs import response_positions, response_sequence_logps, split_responses
from infifpo_mcore.model import set_response_positions, uses_thd_attention

# Per-row entries of the training loss output (the bad-step guard names rows with them) and the micro-batch's pair
# count; metrics are the other keys, each a sum over the micro-batch's pairs.
ROW_IDS = "row_ids"
ROW_LOSSES = "row_losses"
PAIRS = "pairs"
PER_ROW_KEYS = (ROW_IDS, ROW_LOSSES)


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


def preference_loss(logits: Tensor, *, batch: PreferenceBatch, loss: LossConfig,
                    wrpo_alpha: float) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Last stage: response ``logits [1, n, V/TP]`` -> (sum of the B rows' losses, B, reported), the per-token loss
    contract of the module docstring. ``reported``: the loss and every metric summed over the B rows, ``PAIRS`` (B),
    and ``PER_ROW_KEYS``: the rows' dataset indices and losses ``[B]``. ``wrpo_alpha``: WRPO's current alpha."""
    row_losses, row_metrics = loss_rows(_response_logps(logits, batch), batch, loss, wrpo_alpha)
    total = row_losses.sum()
    pairs = torch.tensor(row_losses.shape[0], dtype=torch.int, device=logits.device)
    reported = {"loss": total.detach().clone(), PAIRS: pairs}
    reported.update({name: value.detach().float().sum() for name, value in row_metrics.items()})
    reported.update({ROW_IDS: batch["row_ids"], ROW_LOSSES: row_losses.detach()})
    return total, pairs, reported


def evaluation_rows(logits: Tensor, *, batch: PreferenceBatch, loss: LossConfig,
                    wrpo_alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward-only evaluation: per-row loss and metrics ``[B]`` with their row ids, so duplicates can be dropped;
    also the policy's own log-probs (sums, token counts) and ``policy_margin``, its chosen - rejected per-token
    log-prob: a held-out measure that, unlike the rewards, does not depend on the loss's reference."""
    responses = _response_logps(logits, batch)
    row_losses, row_metrics = loss_rows(responses, batch, loss, wrpo_alpha)
    rows = {"row_ids": batch["row_ids"], "loss": row_losses.detach()}
    rows.update({name: value.detach().float() for name, value in row_metrics.items()})
    for name in ("chosen", "rejected"):
        sums, lengths = responses[name]
        rows[f"policy_{name}_logps"], rows[f"policy_{name}_lengths"] = sums.detach().float(), lengths.float()
    rows["policy_margin"] = (rows["policy_chosen_logps"] / rows["policy_chosen_lengths"]
                             - rows["policy_rejected_logps"] / rows["policy_rejected_lengths"])
    return torch.zeros((), device=logits.device), rows


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
    return _forward_step_with(preference_loss, loss=loss, wrpo_alpha=wrpo_alpha)


def evaluation_forward_step(loss: LossConfig, *, wrpo_alpha: float) -> Callable:
    return _forward_step_with(evaluation_rows, loss=loss, wrpo_alpha=wrpo_alpha)


scoring_forward_step = _forward_step_with(sequence_scores)
