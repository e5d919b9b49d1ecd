import pytest
import torch

from infifpo_mcore.logprobs import (
    response_positions,
    response_sequence_hits,
    response_sequence_logps,
    split_responses,
    vocab_parallel_token_logps,
)
from tests.distributed import run_distributed


def _full_vocab_response_sums(logits, labels, mask):
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def _check_vocab_parallel_matches_full_softmax(ctx, *, logits, labels, mask):
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    shard = logits.chunk(ctx.tensor, dim=-1)[tp_rank].clone().requires_grad_(True)
    ours = vocab_parallel_token_logps(logits=shard, targets=labels)
    reference_logits = logits.clone().requires_grad_(True)
    reference = torch.log_softmax(reference_logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    # Gradients too: the shard's gradient is the matching slice of the full-vocab gradient.
    ours.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(shard.grad, reference_logits.grad.chunk(ctx.tensor, dim=-1)[tp_rank])

    # Response-only path: logits at the selected positions only, [1, n, V/TP], summed back per sequence.
    selected = logits.transpose(0, 1)[response_positions(mask)].unsqueeze(0)
    sums, lengths = response_sequence_logps(
        logits=selected.chunk(ctx.tensor, dim=-1)[tp_rank], labels=labels, loss_mask=mask
    )
    torch.testing.assert_close(sums, _full_vocab_response_sums(logits, labels, mask), rtol=1e-6, atol=1e-5)
    assert lengths.tolist() == mask.sum(-1).tolist()

    # SFT's token accuracy from the shards: per sequence, the response labels that are the full-vocab argmax (every
    # other label made one here); and per packed slot (here: rows 0 and 2 one sequence, rows 1 and 3 another)
    labels = torch.where(torch.arange(labels.shape[1]) % 2 == 0, logits.argmax(-1), labels)
    hits = ((logits.argmax(-1) == labels).float() * mask).sum(-1)
    assert hits.sum() > 0 and (hits < mask.sum(-1)).any()  # some hits, some misses: the count can be wrong
    shard_of = selected.chunk(ctx.tensor, dim=-1)[tp_rank]
    assert response_sequence_hits(logits=shard_of, labels=labels, loss_mask=mask).tolist() == hits.tolist()
    slots = torch.tensor([0, 1, 0, 1])[:, None].expand_as(mask)
    assert response_sequence_hits(logits=shard_of, labels=labels, loss_mask=mask, slots=slots).tolist() == \
        [hits[0] + hits[2], hits[1] + hits[3]]


def test_vocab_parallel_logps_at_tp2_equal_full_vocab_log_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 64, generator=generator) * 4
    labels = torch.randint(0, 64, (4, 6), generator=generator)
    mask = torch.zeros(4, 6)
    mask[0, 2:5] = 1
    mask[1, 1:2] = 1
    mask[2, 3:6] = 1
    mask[3, 0:6] = 1
    run_distributed(
        _check_vocab_parallel_matches_full_softmax, world_size=2, tensor=2, logits=logits, labels=labels, mask=mask
    )


def test_response_positions_are_sequence_major():
    mask = torch.tensor([[0, 1, 1], [1, 0, 1]])
    assert response_positions(mask).tolist() == [[False, True], [True, False], [True, True]]


def test_split_responses_takes_chosen_first_half():
    chosen, rejected = split_responses(torch.arange(6), groups=2)
    assert chosen.tolist() == [0, 1, 2]
    assert rejected.tolist() == [3, 4, 5]


def test_split_responses_puts_wrpo_chosen_pivot_rows_last():
    chosen, rejected, chosen_pivot = split_responses(torch.arange(6), groups=3)
    assert (chosen.tolist(), rejected.tolist(), chosen_pivot.tolist()) == ([0, 1], [2, 3], [4, 5])
    with pytest.raises(ValueError, match="7 rows do not split into 3"):
        split_responses(torch.arange(7), groups=3)
