import torch

from infifpo_mcore.logprobs import sequence_logps, split_pairs, vocab_parallel_token_logps
from tests.distributed import run_distributed


def _check_vocab_parallel_matches_full_softmax(ctx, *, logits, targets):
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    shard = logits.chunk(ctx.tensor, dim=-1)[tp_rank].clone().requires_grad_(True)
    ours = vocab_parallel_token_logps(logits=shard, targets=targets)
    reference_logits = logits.clone().requires_grad_(True)
    reference = torch.log_softmax(reference_logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    # Gradients too: the shard's gradient is the matching slice of the full-vocab gradient.
    ours.sum().backward()
    reference.sum().backward()
    expected = reference_logits.grad.chunk(ctx.tensor, dim=-1)[tp_rank]
    torch.testing.assert_close(shard.grad, expected, rtol=1e-6, atol=1e-6)


def test_vocab_parallel_logps_at_tp2_equal_full_vocab_log_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 64, generator=generator) * 4
    targets = torch.randint(0, 64, (3, 5), generator=generator)
    run_distributed(_check_vocab_parallel_matches_full_softmax, world_size=2, tensor=2, logits=logits, targets=targets)


def test_sequence_logps_sums_only_masked_tokens_and_counts_them():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -0.5, -0.5]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    sums, lengths = sequence_logps(token_logps=token_logps, loss_mask=mask)
    assert sums.tolist() == [-5.0, -2.0]
    assert lengths.tolist() == [2.0, 4.0]


def test_split_pairs_takes_chosen_first_half():
    chosen, rejected = split_pairs(torch.arange(6))
    assert chosen.tolist() == [0, 1, 2]
    assert rejected.tolist() == [3, 4, 5]
