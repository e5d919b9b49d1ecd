"""Preference rows: validation messages, tokenisation, truncation, collation and the resumable sampler."""

import json
import logging
from pathlib import Path

import pytest
import torch

from infifpo_mcore.data import (DataError, ResumableSampler, collate_pairs, load_preference_dataset,
                                read_preference_rows, truncate_example)
from infifpo_mcore.references import cached_columns
from infifpo_mcore.tokenization import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
ANSWER = {"role": "assistant"}
WRPO_RESPONSES = ("chosen", "rejected", "chosen_pivot")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(type="sentencepiece", path="pkg://mistral_common/data/tokenizer.model.v1",
                           chat_template="mistral")


def write_rows(tmp_path, *rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return path


def trl_row(**extra):
    return {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5.", **extra}


def problems_of(path):
    with pytest.raises(DataError) as caught:
        read_preference_rows(path)
    return caught.value.problems


def test_three_row_forms_tokenise_identically(tmp_path, tokenizer):
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    path = write_rows(
        tmp_path, trl_row(),
        {"prompt": conversation, "chosen": [{**ANSWER, "content": "It is 4."}],
         "rejected": [{**ANSWER, "content": "It is 5."}]},
        {"chosen": conversation + [{**ANSWER, "content": "It is 4."}],
         "rejected": conversation + [{**ANSWER, "content": "It is 5."}]})
    dataset = load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None)
    assert len(dataset) == 3 and dataset.num_sources == 0 and cached_columns(dataset) == {}
    assert [e["id"] for e in dataset] == [1, 2, 3]  # default id: the line number
    first = dataset[0]
    assert first["prompt_ids"] == tokenizer.encode_prompt(conversation)
    assert first["chosen_ids"] == tokenizer.encode("It is 4.") + [tokenizer.eos_id]
    for example in dataset.examples[1:]:
        assert {k: example[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} == \
            {k: first[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def test_multi_turn_reference_form_takes_the_shared_prefix_as_prompt(tmp_path):
    shared = [{"role": "user", "content": "Hi"}, {**ANSWER, "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    path = write_rows(tmp_path, {"chosen": shared + [{**ANSWER, "content": "4"}],
                                 "rejected": shared + [{**ANSWER, "content": "5"}]})
    (row,) = read_preference_rows(path)
    assert (row.prompt, row.chosen, row.rejected) == (shared, "4", "5")


def test_every_problem_is_reported_with_file_line_and_field(tmp_path):
    path = write_rows(
        tmp_path,
        trl_row(),
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "", "chosen": 3},
        b"\xff\xfe not utf-8",
        b"",
        {"id": 1, **trl_row(ref_chosen_logps=float("nan"), ref_rejected_logps=0.5)},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
        {"chosen": "a", "rejected": "b"},
        {"chosen": [{"role": "user", "content": "q"}, {**ANSWER, "content": "a"}],
         "rejected": [{"role": "user", "content": "other"}, {**ANSWER, "content": "b"}]},
        {"id": "x", **trl_row(ref_chosen_logp=-1.0)},
        b"[1, 2]",
        b"{not json",
        {"id": "y", **trl_row(ref_mean_chosen_logps=-1.0, ref_mean_rejected_logps=-1.0)})
    where = str(path)
    assert problems_of(path) == [
        f"{where}:2 rejected: identical to chosen",
        f"{where}:3 rejected: missing",
        f"{where}:3 prompt: expected a non-empty string or a non-empty list of messages",
        f"{where}:3 chosen: expected a non-empty string or a non-empty list of messages",
        f"{where}:4 line: not valid UTF-8 (byte 0)",
        f"{where}:6 id: duplicate of line 1 (1)",
        f"{where}:6 ref_chosen_logps: not finite (nan)",
        f"{where}:6 ref_rejected_logps: log-probability must be <= 0, got 0.5",
        f"{where}:7 prompt: the last prompt message must not be an assistant message",
        f"{where}:7 chosen: expected exactly one assistant message, got roles ['user']",
        f"{where}:8 prompt: missing (needed when chosen/rejected are strings)",
        f"{where}:9 chosen: expected the shared prompt messages followed by one assistant message "
        "(got 2 message(s) after 0 shared)",
        f"{where}:9 rejected: expected the shared prompt messages followed by one assistant message "
        "(got 2 message(s) after 0 shared)",
        f"{where}:9 prompt: missing: chosen and rejected share no leading messages and no prompt is given",
        f"{where}:10 ref_chosen_logp: unknown field, did you mean 'ref_chosen_logps'?",
        f"{where}:11 line: expected a JSON object, got list",
        f"{where}:12 line: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{where}:13 ref_chosen_logps: missing (needed together with ref_mean_chosen_logps)",
        f"{where}:13 ref_rejected_logps: missing (needed together with ref_mean_chosen_logps)",
    ]


def fused(chosen, rejected, mean_chosen, mean_rejected):
    return {"fuse_chosen_logps": chosen, "fuse_rejected_logps": rejected,
            "fuse_mean_chosen_logps": mean_chosen, "fuse_mean_rejected_logps": mean_rejected}


def test_cached_score_problems(tmp_path):
    path = write_rows(
        tmp_path,
        trl_row(**fused([-2.0, -6.0], [-3.0, -1.0], [-1.0, -2.0], [-1.5, -0.5])),
        trl_row(**fused([-2.0], [-3.0], [-1.0], [-1.5])),  # one source where line 1 has two
        trl_row(**fused([-2.0, -6.0], [-3.0], [-1.0, -2.0], [0.0, -0.5])),
        trl_row(**fused([-2.0, float("inf")], [-3.0, -1.0], [-1.0, -2.0], [-1.5, -0.5])),
        trl_row(**fused([-2.0, -6.0], [-3.0, -1.0], [-1.0, -2.0], [-1.5, -0.5]), ref_chosen_logps=-1.0,
                ref_rejected_logps=-2.0),
        trl_row(fuse_chosen_logps="-1"))
    where = str(path)
    assert problems_of(path) == [
        f"{where}:2 fuse_chosen_logps: 1 sources, but line 1 has 2",
        f"{where}:3 fuse_rejected_logps: 1 entries, but fuse_chosen_logps has 2",
        f"{where}:3 fuse_mean_rejected_logps[0]: sum -3.0 / mean 0.0 is not a token count >= 1",
        f"{where}:4 fuse_chosen_logps[1]: not finite (inf)",
        f"{where}:5 ref_chosen_logps: present here but not in line 1 (cached scores must be in every row or in none)",
        f"{where}:5 ref_rejected_logps: present here but not in line 1 (cached scores must be in every row or in "
        "none)",
        f"{where}:6 fuse_chosen_logps: expected a non-empty list of log-probabilities, one per source",
        f"{where}:6 fuse_rejected_logps: missing (needed together with fuse_chosen_logps)",
        f"{where}:6 fuse_mean_chosen_logps: missing (needed together with fuse_chosen_logps)",
        f"{where}:6 fuse_mean_rejected_logps: missing (needed together with fuse_chosen_logps)",
    ]


def test_collate_hand_checked_masks_and_labels():
    examples = [{"row_id": 7, "id": "a", "prompt_ids": [1, 5, 6], "chosen_ids": [8, 9, 2], "rejected_ids": [4, 2]},
                {"row_id": 3, "id": "b", "prompt_ids": [1, 7], "chosen_ids": [2], "rejected_ids": [3, 3, 3, 2]}]
    batch = collate_pairs(examples, seq_length=7, pad_id=0)
    assert batch["tokens"].tolist() == [[1, 5, 6, 8, 9, 2, 0],   # chosen a
                                        [1, 7, 2, 0, 0, 0, 0],   # chosen b
                                        [1, 5, 6, 4, 2, 0, 0],   # rejected a
                                        [1, 7, 3, 3, 3, 2, 0]]   # rejected b
    assert batch["labels"].tolist() == [[5, 6, 8, 9, 2, 0, 0],
                                        [7, 2, 0, 0, 0, 0, 0],
                                        [5, 6, 4, 2, 0, 0, 0],
                                        [7, 3, 3, 3, 2, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0],
                                           [0, 1, 0, 0, 0, 0, 0],
                                           [0, 0, 1, 1, 0, 0, 0],
                                           [0, 1, 1, 1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [list(range(7))] * 4
    assert batch["row_ids"].tolist() == [7, 3]
    assert (batch["tokens"].dtype, batch["labels"].dtype, batch["loss_mask"].dtype) == \
        (torch.int64, torch.int64, torch.float32)
    assert "init_chosen_logps" not in batch
    with pytest.raises(ValueError, match="fit seq_length=5"):
        collate_pairs(examples, seq_length=5, pad_id=0)


def _truncate(*, chosen_ids, rejected_ids, **kwargs):
    """truncate_example on a pair, as (prompt, chosen, rejected, truncated)."""
    prompt, kept, truncated = truncate_example(responses={"chosen": chosen_ids, "rejected": rejected_ids}, **kwargs)
    return prompt, kept["chosen"], kept["rejected"], truncated


def test_truncation_keeps_bos_and_cuts_responses_from_the_right():
    prompt, chosen, rejected, truncated = _truncate(
        prompt_ids=[1, 10, 11, 12, 13, 14], chosen_ids=[20, 21, 22, 2], rejected_ids=[30, 2], seq_length=8,
        max_prompt_length=4, bos_id=1)
    assert (prompt, chosen, rejected, truncated) == ([1, 12, 13, 14], [20, 21, 22, 2], [30, 2], True)
    prompt, chosen, rejected, truncated = _truncate(
        prompt_ids=[1, 10, 11], chosen_ids=[20, 21, 22, 2], rejected_ids=[30, 2], seq_length=5,
        max_prompt_length=None, bos_id=1)
    assert (prompt, chosen, rejected, truncated) == ([1, 10, 11], [20, 21], [30, 2], True)
    # max_prompt_length leaves room for one response token; without it a prompt is never cut
    prompt, chosen, _, truncated = _truncate(
        prompt_ids=[9, 10, 11, 12], chosen_ids=[20, 2], rejected_ids=[30, 2], seq_length=3,
        max_prompt_length=3, bos_id=1)
    assert (prompt, chosen, truncated) == ([11, 12], [20], True)
    with pytest.raises(ValueError, match="no room for a response"):
        _truncate(prompt_ids=[9, 10, 11], chosen_ids=[20, 2], rejected_ids=[30, 2], seq_length=3,
                  max_prompt_length=None, bos_id=1)
    assert _truncate(prompt_ids=[1, 5], chosen_ids=[6, 2], rejected_ids=[7, 2], seq_length=4,
                     max_prompt_length=2, bos_id=1)[3] is False


def test_truncated_rows_are_counted_and_logged(tmp_path, tokenizer, caplog):
    long_answer = "one two three four five six seven eight nine ten eleven twelve"
    path = write_rows(tmp_path, trl_row(), trl_row(chosen=long_answer), trl_row(prompt="Hi " * 40))
    with caplog.at_level(logging.WARNING, logger="infifpo_mcore.data"):
        dataset = load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=24, max_prompt_length=16)
    assert dataset.num_truncated == 2
    assert "2 of 3 rows truncated" in caplog.text
    for example in dataset:
        assert len(example["prompt_ids"]) <= 16
        assert len(example["prompt_ids"]) + len(example["chosen_ids"]) <= 24
    assert dataset[2]["prompt_ids"][0] == tokenizer.bos_id


def test_template_errors_name_the_row(tmp_path, tokenizer):
    path = write_rows(tmp_path, trl_row(), trl_row(prompt=[{"role": "system", "content": "s"},
                                                           {"role": "system", "content": "t"}]))
    with pytest.raises(DataError, match=r"prefs\.jsonl:2 prompt: mistral template: message 1 has role 'system'"):
        load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_preference_rows(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_preference_rows(tmp_path / "empty.jsonl")


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_sampler_is_deterministic_and_reshuffles_each_epoch():
    first = take(iter(ResumableSampler(num_rows=10, seed=3)), 20)
    assert first == take(iter(ResumableSampler(num_rows=10, seed=3)), 20)
    assert sorted(first[:10]) == sorted(first[10:]) == list(range(10))
    assert first[:10] != first[10:]
    assert first[:10] != take(iter(ResumableSampler(num_rows=10, seed=4)), 10)
    assert take(iter(ResumableSampler(num_rows=4, seed=3, shuffle=False)), 6) == [0, 1, 2, 3, 0, 1]


def test_sampler_splits_across_data_parallel_ranks():
    ranks = [ResumableSampler(num_rows=11, seed=0, dp_rank=r, dp_size=3) for r in range(3)]
    shares = [take(iter(sampler), 3) for sampler in ranks]
    assert len(set(sum(shares, []))) == 9  # disjoint
    assert sum(shares, []) != list(range(9))
    with pytest.raises(ValueError, match="dp_rank"):
        ResumableSampler(num_rows=2, seed=0, dp_rank=3, dp_size=3)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_global_batches_are_the_same_rows_at_any_data_parallel_size(dp_size):
    """A global batch of 4 rows is the same set of rows whatever the split (across an epoch boundary too)."""
    reference = take(iter(ResumableSampler(num_rows=10, seed=1)), 24)
    streams = [iter(ResumableSampler(num_rows=10, seed=1, dp_rank=r, dp_size=dp_size)) for r in range(dp_size)]
    for step in range(6):
        rows = sorted(sum((take(stream, 4 // dp_size) for stream in streams), []))
        assert rows == sorted(reference[4 * step:4 * step + 4])


def test_sampler_state_resumes_at_another_data_parallel_size():
    single = ResumableSampler(num_rows=10, seed=2)
    stream = iter(single)
    take(stream, 8)
    expected = take(stream, 8)
    halves = [ResumableSampler(num_rows=10, seed=2, dp_rank=r, dp_size=2) for r in range(2)]
    for sampler in halves:
        sampler.load_state_dict(single.state_dict() | {"consumed": 8})
    got = [take(iter(sampler), 4) for sampler in halves]
    assert sorted(sum(got, [])) == sorted(expected)
    with pytest.raises(ValueError, match="not a multiple"):
        ResumableSampler(num_rows=10, seed=2, dp_rank=0, dp_size=3).load_state_dict(single.state_dict() | {"consumed": 8})


@pytest.mark.parametrize("consumed", [0, 4, 7, 8, 19])
def test_resumed_sampler_yields_exactly_the_remaining_order(consumed):
    original = ResumableSampler(num_rows=16, seed=5, dp_rank=1, dp_size=2)
    stream = iter(original)
    take(stream, consumed)
    state = original.state_dict()
    expected = take(stream, 20)
    resumed = ResumableSampler(num_rows=16, seed=5, dp_rank=1, dp_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through a checkpoint file
    assert take(iter(resumed), 20) == expected


def test_sampler_refuses_state_from_a_different_setup():
    state = ResumableSampler(num_rows=16, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed=5, this sampler has 6"):
        ResumableSampler(num_rows=16, seed=6).load_state_dict(state)


def test_bundled_tiny_dataset_loads(tokenizer):
    train = load_preference_dataset(path=REPO / "launch/data/tiny_prefs_train.jsonl", tokenizer=tokenizer,
                                    seq_length=256, max_prompt_length=None)
    evaluation = load_preference_dataset(path=REPO / "launch/data/tiny_prefs_eval.jsonl", tokenizer=tokenizer,
                                         seq_length=256, max_prompt_length=None)
    assert (len(train), len(evaluation)) == (384, 64)
    assert train.num_truncated == evaluation.num_truncated == 0
    assert not {row.id for row in train.rows} & {row.id for row in evaluation.rows}
    assert all(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= 200 for e in train)
    batch = collate_pairs([train[0], train[1]], seq_length=256, pad_id=tokenizer.pad_id)
    assert batch["loss_mask"][0].sum() == len(train[0]["chosen_ids"])


def test_bundled_fused_data_is_the_same_rows_scored_by_two_sources_with_their_own_tokenizers(tokenizer):
    for split in ("train", "eval"):
        fused = load_preference_dataset(path=REPO / f"launch/data/tiny_fused_{split}.jsonl", tokenizer=tokenizer,
                                        seq_length=256, max_prompt_length=None)
        plain = load_preference_dataset(path=REPO / f"launch/data/tiny_prefs_{split}.jsonl", tokenizer=tokenizer,
                                        seq_length=256, max_prompt_length=None)
        assert [row.id for row in fused.rows] == [row.id for row in plain.rows]
        assert [(e["chosen_ids"], e["rejected_ids"]) for e in fused] == [(e["chosen_ids"], e["rejected_ids"])
                                                                          for e in plain]
        assert fused.num_sources == 2 and "init_chosen_logps" not in cached_columns(fused)
        sidecar = json.loads((REPO / f"launch/data/tiny_fused_{split}.jsonl.sources.json").read_text())
        assert [source["name"] for source in sidecar["sources"]] == ["smollm2-135m-instruct", "gemma-3-270m"]
        assert len({source["tokenizer"] for source in sidecar["sources"]}) == 2
        columns = cached_columns(fused)
        for kind in ("chosen", "rejected"):
            # trained models: per token far above chance (-log(49,152) = -10.8, -log(262,144) = -12.5)
            sums, lengths = columns[f"source_{kind}_logps"], columns[f"source_{kind}_lengths"]
            assert sums.shape == (len(fused), 2) and (lengths >= 1).all()
            assert ((sums / lengths > -8.0) & (sums / lengths < 0.0)).all()


# --------------------------------------------------------------------------------------------------------------------
# WRPO's second chosen response (chosen_pivot)
def test_wrpo_chosen_pivot_in_both_forms_is_tokenised_and_collated_last(tmp_path, tokenizer):
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    path = write_rows(
        tmp_path, trl_row(chosen_pivot="Four."),
        {"chosen": conversation + [{**ANSWER, "content": "It is 4."}],
         "rejected": conversation + [{**ANSWER, "content": "It is 5."}],
         "chosen_pivot": conversation + [{**ANSWER, "content": "Four."}]})
    wrpo = load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None,
                                   responses=WRPO_RESPONSES)
    assert [row.chosen_pivot for row in wrpo.rows] == ["Four.", "Four."]
    assert wrpo[0]["chosen_pivot_ids"] == wrpo[1]["chosen_pivot_ids"] == tokenizer.encode_response("Four.")
    batch = collate_pairs([wrpo[0], wrpo[1]], seq_length=64, pad_id=tokenizer.pad_id)
    assert batch["tokens"].shape == (6, 64) and batch["row_ids"].tolist() == [0, 1]
    prompt = len(wrpo[0]["prompt_ids"])
    pivot_rows = batch["tokens"][4:, prompt:prompt + len(wrpo[0]["chosen_pivot_ids"])]
    assert pivot_rows.tolist() == [wrpo[0]["chosen_pivot_ids"]] * 2
    assert batch["loss_mask"][4:].sum(dim=1).tolist() == [len(wrpo[0]["chosen_pivot_ids"])] * 2
    # Other losses validate the field but leave it out of their batches.
    dpo = load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None)
    assert "chosen_pivot_ids" not in dpo[0]
    assert collate_pairs([dpo[0]], seq_length=64, pad_id=tokenizer.pad_id)["tokens"].shape == (2, 64)
    with pytest.raises(ValueError, match="carry different responses"):
        collate_pairs([wrpo[0], dpo[1]], seq_length=64, pad_id=tokenizer.pad_id)


def test_wrpo_chosen_pivot_problems_are_reported_with_file_line_and_field(tmp_path, tokenizer):
    conversation = [{"role": "user", "content": "q"}]
    path = write_rows(
        tmp_path,
        trl_row(chosen_pivot="Four."),
        trl_row(chosen_pivot="It is 5."),
        trl_row(chosen_pivot=""),
        trl_row(chosen_pivot=[{"role": "user", "content": "Four."}]),
        trl_row(),
        {"chosen": conversation + [{**ANSWER, "content": "a"}], "rejected": conversation + [{**ANSWER, "content": "b"}],
         "chosen_pivot": [{"role": "user", "content": "other"}, {**ANSWER, "content": "c"}]},
        {"chosen": conversation + [{**ANSWER, "content": "a"}], "rejected": conversation + [{**ANSWER, "content": "b"}],
         "chosen_pivot": "c"},
        trl_row(chosen_pivt="Four."))
    where = str(path)
    expected = [
        f"{where}:2 chosen_pivot: identical to rejected",
        f"{where}:3 chosen_pivot: expected a non-empty string or a non-empty list of messages",
        f"{where}:4 chosen_pivot: expected exactly one assistant message, got roles ['user']",
        f"{where}:5 chosen_pivot: missing (loss.type=wrpo needs the pivot's own chosen response in every row)",
        f"{where}:6 chosen_pivot: expected the 1 prompt message(s) chosen and rejected share, followed by one "
        "assistant message",
        f"{where}:7 chosen_pivot: expected a conversation like chosen's (the rows have no prompt field)",
        f"{where}:8 chosen_pivt: unknown field, did you mean 'chosen_pivot'?",
        f"{where}:8 chosen_pivot: missing (loss.type=wrpo needs the pivot's own chosen response in every row)",
    ]
    with pytest.raises(DataError) as caught:
        load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None,
                                responses=WRPO_RESPONSES)
    assert caught.value.problems == expected
    # Other losses do not need it, but a chosen_pivot that is there is still checked.
    assert problems_of(path) == [problem for problem in expected if "missing" not in problem]
    # data.skip_invalid_rows: the rows with wrpo-field problems are left out and listed.
    kept = load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None,
                                   responses=WRPO_RESPONSES, skip_invalid=True)
    assert len(kept) == 1 and kept.num_skipped_rows == 7 and kept.skipped == expected


def test_wrpo_refuses_data_without_any_chosen_pivot_naming_file_and_field(tmp_path, tokenizer):
    path = write_rows(tmp_path, trl_row(), trl_row(prompt="Hi"))
    for skip_invalid in (False, True):
        with pytest.raises(DataError, match=rf"{path}: no row has a chosen_pivot field, which loss.type=wrpo needs"):
            load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None,
                                    responses=WRPO_RESPONSES, skip_invalid=skip_invalid)


def test_wrpo_chosen_pivot_is_truncated_like_the_responses_and_must_still_differ(tmp_path, tokenizer):
    long_prefix = "one two three four five six seven eight nine ten " * 3
    path = write_rows(tmp_path, trl_row(chosen="A", rejected=long_prefix + "end", chosen_pivot=long_prefix + "fin"),
                      trl_row(prompt="Hi", chosen="A", rejected="B", chosen_pivot=long_prefix))
    prompt = len(tokenizer.encode_prompt([{"role": "user", "content": "What is 2 + 2?"}]))
    with pytest.raises(DataError, match=r":1 chosen_pivot: identical to rejected in the first \d+ response tokens"):
        load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=prompt + 12, max_prompt_length=None,
                                responses=WRPO_RESPONSES)
    dataset = load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=prompt + 12, max_prompt_length=None,
                                      responses=WRPO_RESPONSES, skip_invalid=True)
    (example,) = dataset.examples
    assert len(example["prompt_ids"]) + len(example["chosen_pivot_ids"]) == prompt + 12
    assert dataset.num_truncated == 1


# --------------------------------------------------------------------------------------------------------------------
# Issue #19: every common file format, TRL's SFT rows, WRPO's authors' rows
def _contents(dataset):
    return [(row.id, row.prompt, row.chosen, row.rejected, row.chosen_pivot, row.cached) for row in dataset.rows], \
        list(dataset.examples)


@pytest.fixture(scope="module")
def fused_rows():
    """Rows of the bundled fused data: chat-message lists, ids, cached fuse_* lists of two sources, a metadata
    column (canary)."""
    return [json.loads(line) for line in (REPO / "launch/data/tiny_fused_train.jsonl").read_text().splitlines()[:6]]


def test_every_input_format_gives_the_same_dataset_as_jsonl(tmp_path, tokenizer, fused_rows):
    import datasets

    def load(path, **kwargs):
        return load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=128, max_prompt_length=None,
                                       num_sources=2, **kwargs)

    expected = _contents(load(write_rows(tmp_path, *fused_rows)))
    table = datasets.Dataset.from_list(fused_rows)
    table.to_parquet(str(tmp_path / "prefs.parquet"))
    table.select(range(3)).to_parquet(str(tmp_path / "part-0.parquet"))
    table.select(range(3, 6)).to_parquet(str(tmp_path / "part-1.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(str(tmp_path / "splits"))
    (tmp_path / "array.json").write_text(json.dumps(fused_rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(row) + "\n" for row in fused_rows))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path, kwargs in [(tmp_path / "prefs.parquet", {}), (str(tmp_path / "part-*.parquet"), {}),
                         (tmp_path / "saved", {}), (arrow, {}), (tmp_path / "splits", {"split": "train"}),
                         (tmp_path / "array.json", {}), (tmp_path / "lines.json", {})]:
        assert _contents(load(path, **kwargs)) == expected, path
    assert len(load(tmp_path / "splits", split="test")) == 2
    with pytest.raises(DataError, match=r"splits holds the splits \['train', 'test'\]: set data.split"):
        load(tmp_path / "splits")
    with pytest.raises(DataError, match=r"prefs.parquet: data.split='train' chooses a split of a "):
        load(tmp_path / "prefs.parquet", split="train")
    with pytest.raises(DataError, match=r"prefs.csv: unknown format .csv; expected a .jsonl/.json file"):
        (tmp_path / "prefs.csv").write_text("a,b\n")
        load(tmp_path / "prefs.csv")


def test_bad_rows_in_every_format_are_reported_by_file_row_and_field(tmp_path, tokenizer):
    import datasets

    rows = [trl_row(id="a"), trl_row(id="b", rejected="It is 4."), trl_row(id="c", ref_chosen_logps=0.5,
                                                                         ref_rejected_logps=-1.0)]
    rows[0]["ref_chosen_logps"], rows[0]["ref_rejected_logps"] = -3.0, -4.0
    rows[1]["ref_chosen_logps"], rows[1]["ref_rejected_logps"] = -3.0, -4.0
    table = datasets.Dataset.from_list(rows + [{"id": "d", "prompt": "Hi", "chosen": "A", "rejected": None,
                                                "ref_chosen_logps": float("nan"), "ref_rejected_logps": -1.0}])
    table.to_parquet(str(tmp_path / "bad.parquet"))
    table.save_to_disk(str(tmp_path / "bad_saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "bad_splits"))
    (tmp_path / "bad.json").write_text(json.dumps(rows + ["not a row"]))
    for path, where in [(tmp_path / "bad.parquet", f"{tmp_path / 'bad.parquet'} row"),
                        (tmp_path / "bad_saved", f"{tmp_path / 'bad_saved'} row"),
                        (tmp_path / "bad_splits", f"{tmp_path / 'bad_splits'}[train] row"),
                        (arrow := next((tmp_path / "bad_saved").glob("*.arrow")), f"{arrow} row")]:
        with pytest.raises(DataError) as caught:
            load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None)
        assert caught.value.problems == [
            f"{where} 1 rejected: identical to chosen",
            f"{where} 2 ref_chosen_logps: log-probability must be <= 0, got 0.5",
            f"{where} 3 rejected: missing",  # null in the shared schema: absent
            f"{where} 3 ref_chosen_logps: not finite (nan)",
        ], path
    with pytest.raises(DataError) as caught:
        read_preference_rows(tmp_path / "bad.json")
    assert caught.value.problems == [
        f"{tmp_path / 'bad.json'} row 1 rejected: identical to chosen",
        f"{tmp_path / 'bad.json'} row 2 ref_chosen_logps: log-probability must be <= 0, got 0.5",
        f"{tmp_path / 'bad.json'} row 3 row: expected a JSON object, got str",
    ]
    # Two files: each row is named by its own file; default ids do not collide across them
    write_rows(tmp_path, trl_row(), name="a.jsonl")
    write_rows(tmp_path, trl_row(), trl_row(prompt=""), name="b.jsonl")
    with pytest.raises(DataError) as caught:
        read_preference_rows(str(tmp_path / "[ab].jsonl"))
    assert caught.value.problems == [f"{tmp_path / 'b.jsonl'}:2 prompt: expected a non-empty string or a non-empty "
                                     "list of messages"]
    # A .jsonl is JSON Lines even when its first line opens an array (only a .json may hold one array of rows)
    (tmp_path / "array.jsonl").write_text("[\n" + json.dumps(trl_row()) + "\n")
    with pytest.raises(DataError) as caught:
        read_preference_rows(tmp_path / "array.jsonl")
    assert [problem.split(" ", 1)[0] for problem in caught.value.problems] == [f"{tmp_path / 'array.jsonl'}:1"]


def test_sft_rows_in_trl_forms_and_the_chosen_of_preference_rows(tmp_path, tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    path = write_rows(tmp_path,
                      {"prompt": "What is 2 + 2?", "completion": "It is 4."},
                      {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
                       "completion": [{**ANSWER, "content": "It is 4."}]},
                      {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {**ANSWER, "content": "It is 4."}]},
                      trl_row(),
                      {"messages": conversation + [{**ANSWER, "content": "4."}]})
    sft = load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None,
                                  responses=("chosen",))
    assert [row.rejected for row in sft.rows] == [None, None, None, "It is 5.", None]
    assert all(set(example) == {"row_id", "id", "prompt_ids", "chosen_ids"} for example in sft)
    first = {k: sft[0][k] for k in ("prompt_ids", "chosen_ids")}
    assert all({k: example[k] for k in ("prompt_ids", "chosen_ids")} == first for example in sft.examples[1:4])
    assert sft[4]["prompt_ids"] == tokenizer.encode_prompt(conversation)
    batch = collate_pairs([sft[0], sft[4]], seq_length=64, pad_id=tokenizer.pad_id)
    assert batch["tokens"].shape == (2, 64) and batch["loss_mask"].sum(dim=1).tolist() == [
        len(sft[0]["chosen_ids"]), len(sft[4]["chosen_ids"])]
    # A preference loss refuses SFT rows by row and field
    with pytest.raises(DataError) as caught:
        load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None)
    assert caught.value.problems == [
        f"{path}:{line} rejected: missing: an SFT row ({form}) has no rejected response, and a preference loss "
        "trains on pairs" for line, form in ((1, "prompt and completion"), (2, "prompt and completion"),
                                             (3, "messages"), (5, "messages"))]


def test_bad_sft_rows_are_reported_with_file_line_and_field(tmp_path, tokenizer):
    path = write_rows(tmp_path,
                      {"prompt": "q", "completion": "a"},
                      {"completion": "a"},
                      {"prompt": "q", "completion": ""},
                      {"messages": [{"role": "user", "content": "q"}]},
                      {"messages": [{**ANSWER, "content": "a"}, {**ANSWER, "content": "b"}]},
                      {"messages": [{"role": "user", "content": "q"}, {**ANSWER, "content": "a"}], "prompt": "q"},
                      {"prompt": "q", "completion": [{"role": "user", "content": "a"}]})
    with pytest.raises(DataError) as caught:
        load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None,
                                responses=("chosen",))
    assert caught.value.problems == [
        f"{path}:2 prompt: missing (needed with completion)",
        f"{path}:3 completion: expected a non-empty string or a non-empty list of messages",
        f"{path}:4 messages: expected prompt messages followed by the assistant message to train on (got roles "
        "['user'])",
        f"{path}:5 messages: expected prompt messages followed by the assistant message to train on (got roles "
        "['assistant', 'assistant'])",
        f"{path}:6 messages: give either messages or prompt and completion, not both",
        f"{path}:7 completion: expected exactly one assistant message, got roles ['user']",
    ]


def test_wrpo_authors_rows_read_their_second_chosen_as_chosen_pivot(tmp_path, tokenizer):
    """SLIT-AI/WRPO's format: prompt one message, chosen [y_ws, y_wt], rejected [y_l]; the same dataset as ours."""
    ours = write_rows(tmp_path, trl_row(chosen_pivot="Four."), name="ours.jsonl")
    theirs = write_rows(tmp_path, {"prompt_id": "x", "prompt": {"role": "user", "content": "What is 2 + 2?"},
                                   "chosen": [{**ANSWER, "content": "It is 4."}, {**ANSWER, "content": "Four."}],
                                   "rejected": [{**ANSWER, "content": "It is 5."}]},
                        {"prompt": "Hi", "chosen": [{**ANSWER, "content": "A"}, {**ANSWER, "content": "B"}],
                         "rejected": [{**ANSWER, "content": "B"}]}, name="theirs.jsonl")

    def load(path, **kwargs):
        return load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=64, max_prompt_length=None,
                                       responses=WRPO_RESPONSES, **kwargs)

    with pytest.raises(DataError) as caught:
        load(theirs)
    assert caught.value.problems == [f"{theirs}:2 chosen[1]: identical to rejected (y_wt, read as chosen_pivot)"]
    wrpo = load(theirs, skip_invalid=True)
    assert wrpo.examples[0] | {"id": 1} == load(ours).examples[0]
    assert wrpo.rows[0].chosen == "It is 4." and wrpo.rows[0].chosen_pivot == "Four."
    # DPO takes y_ws as the chosen response and leaves y_wt out of its batches
    (dpo,) = load_preference_dataset(path=theirs, tokenizer=tokenizer, seq_length=64, max_prompt_length=None,
                                     skip_invalid=True).examples
    assert "chosen_pivot_ids" not in dpo and dpo["chosen_ids"] == wrpo[0]["chosen_ids"]
