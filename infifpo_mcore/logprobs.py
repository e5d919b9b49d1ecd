"""Per-token and per-sequence log-probs of responses from tensor-parallel (vocab-sharded) logits.

Each TP rank holds logits for its slice of the vocabulary. Megatron-Core's ``vocab_parallel_cross_entropy`` computes
log-softmax with two all-reduces over the TP group (max and sum-exp) plus a masked pick of the target logit, so the
full vocabulary is never gathered on one rank; we use it in fp32 whatever the model's precision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch import Tensor


def vocab_parallel_token_logps(*, logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target | prefix) for every position.

    Args:
        logits: ``[N, S, V / TP]`` this rank's vocabulary slice.
        targets: ``[N, S]`` token ids in the full (padded) vocabulary.

    Returns:
        ``[N, S]`` fp32 log-probs, identical on every TP rank (any leading shape works the same way).
    """
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)


def response_positions(loss_mask: Tensor) -> Tensor:
    """``[N, S]`` loss mask -> ``[S, N]`` bool: where the model's output layer must produce logits."""
    return loss_mask.t().bool()


def _sequence_index(positions: Tensor, *, labels: Tensor, slots: Tensor | None) -> tuple[Tensor, int]:
    """The sequence each response position (``response_positions`` order) belongs to, and the sequence count."""
    if slots is None:
        return positions.nonzero()[:, 1], labels.shape[0]
    sequence_index = slots.t()[positions]
    return sequence_index, int(sequence_index.max()) + 1


def response_sequence_logps(*, logits: Tensor, labels: Tensor, loss_mask: Tensor,
                            slots: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of response log-probs and response lengths.

    Args:
        logits: ``[1, n, V / TP]`` logits at the n positions of ``response_positions(loss_mask)``, in its order.
        labels: ``[N, S]`` next-token targets.
        loss_mask: ``[N, S]`` 1 where ``labels`` is a response token.
        slots: ``[N, S]`` the sequence each response label belongs to (packed rows, several sequences per row:
            ``packing.collate_packed``), or None: row n is sequence n.

    Returns:
        ``(sums [M], lengths [M])`` fp32, M = N, or with ``slots`` its largest value + 1.
    """
    positions = response_positions(loss_mask)
    targets = labels.t()[positions]
    token_logps = vocab_parallel_token_logps(logits=logits, targets=targets.unsqueeze(0)).squeeze(0)
    sequence_index, count = _sequence_index(positions, labels=labels, slots=slots)
    sums = torch.zeros(count, dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, sequence_index, token_logps)
    if slots is None:
        return sums, loss_mask.float().sum(dim=-1)
    return sums, torch.zeros_like(sums).index_add(0, sequence_index, torch.ones_like(token_logps))


def response_sequence_hits(*, logits: Tensor, labels: Tensor, loss_mask: Tensor,
                           slots: Tensor | None = None) -> Tensor:
    """Per sequence, the response tokens that are the argmax of the logits over the whole vocabulary (SFT's token
    accuracy; a tie with the target counts as a hit), from vocabulary-sharded logits with two all-reduces over the
    TP group (the max logit, the target's logit). Call it before ``response_sequence_logps``, whose log-softmax
    works on the logits in place.

    Args: as ``response_sequence_logps``. Returns: ``[M]`` fp32 counts (M as there), identical on every TP rank.
    """
    positions = response_positions(loss_mask)
    targets = labels.t()[positions]  # [n]
    with torch.no_grad():
        local = logits.detach()[0].float()  # [n, V / TP]
        width = local.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * width
        best = local.max(dim=-1).values
        mine = (targets >= first) & (targets < first + width)
        picked = local.gather(-1, (targets - first).clamp(0, width - 1)[:, None]).squeeze(-1)
        target_logit = torch.where(mine, picked, torch.zeros_like(picked))
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            group = parallel_state.get_tensor_model_parallel_group()
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(target_logit, group=group)
        hits = (target_logit >= best).float()
    sequence_index, count = _sequence_index(positions, labels=labels, slots=slots)
    return torch.zeros(count, dtype=hits.dtype, device=hits.device).index_add(0, sequence_index, hits)


def split_responses(values: Tensor, *, groups: int) -> tuple[Tensor, ...]:
    """Rows ``[G*B, ...]`` laid out response by response (``data.collate_pairs``: chosen, rejected, and WRPO's
    chosen_pivot when G = 3) -> G tensors ``[B, ...]`` in that order."""
    if values.shape[0] % groups:
        raise ValueError(f"{values.shape[0]} rows do not split into {groups} responses per row")
    return tuple(values.chunk(groups))
