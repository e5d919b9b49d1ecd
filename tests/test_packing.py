"""Packed micro-batches: the row layout, which pairs share a micro-batch, and that every data-parallel rank runs
as many micro-batches while every pair of an epoch lands in exactly one."""

import random

import pytest
import torch

from infifpo_mcore.config import ConfigError, load_config
from infifpo_mcore.data import ResumableSampler, load_preference_dataset
from infifpo_mcore.packing import (ALIGN, balance, collate_packed, pack, packed_length, packed_micro_batches,
                                   pair_tokens, resolve_packing, split_to, token_budget)
from infifpo_mcore.tokenization import build_tokenizer
from tests.distributed import run_distributed

PAIRS = [dict(row_id=7, id="a", prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6]),
         dict(row_id=3, id="b", prompt_ids=[9], chosen_ids=[10], rejected_ids=[11, 12, 13])]


def test_unshared_pairs_are_their_sequences_one_after_the_other_with_positions_restarting():
    batch = collate_packed(PAIRS, length=20, pad_id=0, share_prompt=False)
    # [1 2 3 4 5] [1 2 3 6] [9 10] [9 11 12 13] then 5 pad tokens (a document of their own)
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 6, 9, 10, 9, 11, 12, 13, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4]]
    assert batch["documents"].tolist() == [0, 5, 9, 11, 15] and batch["documents"].dtype == torch.int32
    # response labels go to the unpacked order: chosen of pairs 0, 1 (slots 0, 1), then rejected (2, 3)
    assert batch["response_slots"].tolist() == [[-1, -1, 0, 0, -1, -1, -1, 2, -1, 1, -1, 3, 3, 3, -1] + [-1] * 5]
    labels, slots = batch["labels"][0], batch["response_slots"][0]
    assert labels[slots >= 0].tolist() == [4, 5, 6, 10, 11, 12, 13]
    assert torch.equal(batch["loss_mask"], (batch["response_slots"] >= 0).float())
    assert batch["branches"].abs().sum() == 0 and batch["row_ids"].tolist() == [7, 3]
    assert [pair_tokens(pair, share_prompt=False) for pair in PAIRS] == [9, 6]


def test_a_shared_prompt_is_held_once_and_each_response_branch_restarts_from_its_last_token():
    batch = collate_packed(PAIRS, length=16, pad_id=0, share_prompt=True)
    # pair 0: prefix [1 2], branches [3 4 5] and [3 6]; pair 1: no prefix, branches [9 10] and [9 11 12 13]
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 5, 3, 6, 9, 10, 9, 11, 12, 13, 0, 0, 0]]
    assert batch["branches"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 1, 1, 2, 2, 2, 2, 0, 0, 0]]
    # each branch's positions continue from the prompt, as the unpacked response's do
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["documents"].tolist() == [0, 7, 13]  # one document per pair; the pad tail is none
    assert batch["response_slots"].tolist() == [[-1, -1, 0, 0, -1, 2, -1, 1, -1, 3, 3, 3, -1, -1, -1, -1]]
    labels, slots = batch["labels"][0], batch["response_slots"][0]
    assert labels[slots >= 0].tolist() == [4, 5, 6, 10, 11, 12, 13]  # the prompt's last token predicts each first one
    assert [pair_tokens(pair, share_prompt=True) for pair in PAIRS] == [7, 6]


def test_a_third_response_gets_the_third_block_of_slots():
    pairs = [dict(pair, chosen_pivot_ids=[20 + index]) for index, pair in enumerate(PAIRS)]
    for share_prompt in (False, True):
        batch = collate_packed(pairs, length=32, pad_id=0, share_prompt=share_prompt)
        slots = batch["response_slots"][0]
        assert sorted(set(slots.tolist()) - {-1}) == list(range(6))
        assert batch["labels"][0][slots >= 4].tolist() == [20, 21]


def test_packing_refuses_a_row_too_short_for_its_pairs():
    with pytest.raises(ValueError, match="take 15 tokens, more than the packed length 14"):
        collate_packed(PAIRS, length=14, pad_id=0, share_prompt=False)


def test_first_fit_decreasing_keeps_every_pair_once_within_the_budget():
    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.randint(5, 64) for _ in range(rng.randint(1, 40))]
        bins = pack(sizes, budget=128)
        assert sorted(i for members in bins for i in members) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in members) <= 128 for members in bins)
        assert bins == pack(sizes, budget=128)  # deterministic
        # no two bins could have been one: first fit leaves no pair a fitting earlier bin
        loads = [sum(sizes[i] for i in members) for members in bins]
        assert all(loads[a] + min(sizes[i] for i in bins[b]) > 128 for a in range(len(bins)) for b in range(a + 1, len(bins)))
        for count in range(len(bins), min(len(bins) + 4, len(sizes)) + 1):
            split = split_to(bins, sizes=sizes, count=count)
            for result in (split, balance(split, sizes=sizes, budget=128)):
                assert len(result) == count and all(result)
                assert sorted(i for members in result for i in members) == list(range(len(sizes)))
                assert all(sum(sizes[i] for i in members) <= 128 for members in result)
            fullest = [max(sum(sizes[i] for i in members) for members in result)
                       for result in (split, balance(split, sizes=sizes, budget=128))]
            assert fullest[1] <= fullest[0]
    with pytest.raises(ValueError, match="a pair of 129 tokens exceeds the packing budget of 128"):
        pack([3, 129], budget=128)


def test_balancing_evens_the_micro_batches_out():
    sizes = [50, 40, 30, 20, 10, 5]  # first fit: 125 and 30 tokens, so both rows would take 128
    bins = pack(sizes, budget=128)
    assert bins == [[0, 1, 2, 5], [3, 4]]
    assert balance(bins, sizes=sizes, budget=128) == [[0, 3, 4], [1, 2, 5]]  # 80 and 75: rows of 80
    assert balance([[0], [1]], sizes=[100, 8], budget=112) == [[0], [1]]  # nothing to even


def test_the_packed_length_is_the_longest_micro_batch_rounded_up_within_the_budget():
    sizes = [40, 30, 50]
    assert packed_length([[0, 1], [2]], sizes=sizes, budget=128) == -(-70 // ALIGN) * ALIGN
    assert packed_length([[0, 1, 2]], sizes=sizes, budget=121) == 121


def test_the_default_budget_is_the_unpacked_micro_batch_and_a_smaller_one_is_refused():
    assert token_budget(micro_batch_size=2, responses=2, seq_length=128, pack_tokens=None) == 512
    assert token_budget(micro_batch_size=2, responses=2, seq_length=128, pack_tokens=300) == 300
    with pytest.raises(ConfigError, match=r"data.pack_tokens \(255\) must be >= 256, the 2 sequences"):
        load_config(overrides=["loss.type=dpo", "model.seq_length=128", "data.pack_tokens=255"])
    with pytest.raises(ConfigError, match=r"data.pack_tokens \(300\) must be >= 384, the 3 sequences"):
        load_config(overrides=["loss.type=wrpo", "model.seq_length=128", "data.pack_tokens=300"])
    with pytest.raises(ConfigError, match="data.share_prompt: true needs packed micro-batches"):
        load_config(overrides=["data.packing=false", "data.share_prompt=true"])


def test_a_pair_longer_than_the_sequence_length_is_truncated_and_reported_as_unpacked_then_fits(tmp_path, caplog):
    """Truncation happens at load, as unpacked (counted, warned): every pair then fits the budget of
    responses x seq_length, so packing never cuts anything itself."""
    long_answer = " ".join(["word"] * 80)
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "a question", "chosen": "yes", "rejected": "no"}\n'
                    f'{{"prompt": "another question", "chosen": "{long_answer}", "rejected": "no"}}\n')
    tokenizer = build_tokenizer(type="sentencepiece", path="pkg://mistral_common/data/tokenizer.model.v1",
                                chat_template="mistral")
    with caplog.at_level("WARNING"):
        dataset = load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=32, max_prompt_length=None)
    assert dataset.num_truncated == 1 and "1 of 2 rows truncated to seq_length=32" in caplog.text
    budget = token_budget(micro_batch_size=1, responses=2, seq_length=32, pack_tokens=None)
    sizes = [pair_tokens(example, share_prompt=False) for example in dataset]
    assert max(sizes) <= budget and len(dataset[1]["prompt_ids"]) + len(dataset[1]["chosen_ids"]) == 32
    assert sorted(i for members in pack(sizes, budget=budget) for i in members) == [0, 1]


def test_packing_is_on_where_its_attention_is_verified():
    local = dict(thd_attention=False, sliding_window=None)
    assert resolve_packing(packing=None, share_prompt=None, **local)[:2] == (True, True)
    assert resolve_packing(packing=None, share_prompt=False, **local)[:2] == (True, False)
    assert resolve_packing(packing=False, share_prompt=None, **local)[:2] == (False, False)
    te = dict(thd_attention=True, sliding_window=None)
    packed, shared, note = resolve_packing(packing=None, share_prompt=None, **te)
    assert (packed, shared) == (False, False) and "has not been verified" in note
    assert resolve_packing(packing=True, share_prompt=None, **te)[:2] == (True, False)
    with pytest.raises(ConfigError, match="data.share_prompt: Transformer Engine's packed"):
        resolve_packing(packing=True, share_prompt=True, **te)
    with pytest.raises(ConfigError, match="sliding-window attention on Transformer Engine"):
        resolve_packing(packing=True, share_prompt=None, thd_attention=True, sliding_window=8)


def _epoch_of_packed_micro_batches(ctx, *, sizes: list[int], global_batch: int, budget: int):
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group(with_context_parallel=False)
    examples = [dict(row_id=i, id=i, prompt_ids=[1] * (size // 2), chosen_ids=[2] * (size - size // 2),
                     rejected_ids=[3]) for i, size in enumerate(sizes)]
    sampler = ResumableSampler(num_rows=len(sizes), seed=5, dp_rank=ctx.data_rank, dp_size=ctx.data)
    rows = iter(sampler)
    seen, counts, own = [], [], []
    for _ in range(len(sizes) // global_batch):  # one epoch
        mine = [examples[next(rows)] for _ in range(global_batch // ctx.data)]
        own.append(len(pack([pair_tokens(e, share_prompt=True) for e in mine], budget=budget)))
        batches = packed_micro_batches(mine, budget=budget, share_prompt=True, pad_id=0, data_group=group,
                                       device=ctx.device)
        counts.append(len(batches))
        assert len({batch["tokens"].shape for batch in batches}) == 1  # one shape per schedule call
        seen += [row for batch in batches for row in batch["row_ids"].tolist()]
    gathered = [None] * ctx.data
    torch.distributed.all_gather_object(gathered, (seen, counts, own))
    (seen_0, counts_0, own_0), (seen_1, counts_1, own_1) = gathered
    assert sorted(seen_0 + seen_1) == list(range(len(sizes)))
    assert counts_0 == counts_1 and len(set(counts_0)) > 1  # the count varies by step, never by rank
    assert own_0 != own_1  # in some steps one rank's pairs alone would have packed into fewer
    # under a virtual pipeline the count is rounded up to whole groups of PP, every pair still once
    first_step = [examples[row] for row in range(ctx.data_rank, global_batch, ctx.data)]
    grouped = packed_micro_batches(first_step, budget=budget, share_prompt=True, pad_id=0, data_group=group,
                                   device=ctx.device, count_multiple=4)
    assert len(grouped) == 4 and len({batch["tokens"].shape for batch in grouped}) == 1
    assert sorted(row for batch in grouped for row in batch["row_ids"].tolist()) == [e["row_id"] for e in first_step]


@pytest.mark.distributed
def test_every_pair_of_an_epoch_lands_in_one_micro_batch_and_ranks_run_as_many():
    rng = random.Random(1)
    sizes = [rng.choice([6, 10, 40, 90]) for _ in range(48)]  # very different lengths: counts differ per rank
    run_distributed(_epoch_of_packed_micro_batches, world_size=2, sizes=sizes, global_batch=8, budget=128)
