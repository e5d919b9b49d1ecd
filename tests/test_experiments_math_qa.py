"""The fusion experiment's own logic (launch/experiments/math_qa.py): question filtering, the answer check for the
pivot's generations, and multiple-choice accuracy from per-row evaluation dumps. The stages themselves run real
models for an hour and more; docs/EXPERIMENT.md records their output."""

from __future__ import annotations

import importlib.util
import random

import pytest

from infifpo_mcore.tokenization import build_tokenizer
from tests.launcher import REPO


@pytest.fixture(scope="module")
def math_qa():
    spec = importlib.util.spec_from_file_location("math_qa", REPO / "launch" / "experiments" / "math_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_answer_check_wants_the_correct_choice_and_no_other(math_qa):
    choices = ["2 %", "240 %", "5 %", "50 %", "500 %"]
    assert math_qa.picks_correct("The answer is 240%.", choices=choices, correct="240 %")
    assert math_qa.picks_correct("240 %\nbecause 120 / 50 = 2.4", choices=choices, correct="240 %")
    assert not math_qa.picks_correct("The answer is 2400 %.", choices=choices, correct="240 %")  # a longer number
    assert not math_qa.picks_correct("240 % or 50 %", choices=choices, correct="240 %")  # two choices named
    assert not math_qa.picks_correct("The answer is 50 %.", choices=choices, correct="240 %")
    assert not math_qa.picks_correct("0.5 %", choices=choices, correct="5 %")  # part of a decimal


def _task(count: int) -> dict:
    rng = random.Random(0)
    examples = []
    for index in range(count):
        values = rng.sample(range(1, 999), 5 if index % 3 else 4)  # every third question has only 4 choices
        examples.append({"input": f"what is {values[0]} ?",
                         "target_scores": {str(v): int(i == 0) for i, v in enumerate(values)}})
    return {"examples": examples, "canary": "canary"}


def test_questions_keep_five_choice_problems_that_fit_and_are_reproducible(math_qa):
    tokenizer = build_tokenizer(type="sentencepiece", path="pkg://mistral_common/data/tokenizer.model.v1",
                                chat_template="mistral")
    task = _task(30)
    picked = math_qa._questions(task, seed=3, count=10, tokenizer=tokenizer, max_tokens=64)
    assert picked == math_qa._questions(task, seed=3, count=10, tokenizer=tokenizer, max_tokens=64)
    assert picked != math_qa._questions(task, seed=4, count=10, tokenizer=tokenizer, max_tokens=64)
    for question in picked:
        assert len(question["choices"]) == 5 and question["correct"] in question["choices"]
    with pytest.raises(SystemExit, match="usable questions"):
        math_qa._questions(task, seed=3, count=10, tokenizer=tokenizer, max_tokens=12)  # nothing fits


def _dump_entry(row_id, chosen, rejected, chosen_len=4, rejected_len=4) -> dict:
    return {"id": row_id, "policy_chosen_logps": chosen, "policy_rejected_logps": rejected,
            "policy_chosen_lengths": chosen_len, "policy_rejected_lengths": rejected_len}


def test_multiple_choice_accuracy_needs_the_correct_answer_above_every_wrong_one(math_qa):
    rows = [{"id": f"q{q}/{c}", "question": f"q{q}"} for q in range(3) for c in range(4)]
    dump = (
        # q0: correct beats all four wrong choices by sum and by mean
        [_dump_entry(f"q0/{c}", -4.0, -8.0) for c in range(4)]
        # q1: one wrong choice ties: a tie is not a win
        + [_dump_entry(f"q1/{c}", -4.0, -4.0 if c == 2 else -9.0) for c in range(4)]
        # q2: loses one pair by sum (a short wrong answer) but wins it per token
        + [_dump_entry(f"q2/{c}", -6.0, -5.0 if c == 0 else -9.0, chosen_len=6, rejected_len=2) for c in range(4)]
    )
    assert math_qa.multiple_choice(rows, dump) == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}
    with pytest.raises(KeyError):
        math_qa.multiple_choice(rows, dump[:-1])  # a held-out row missing from the dump is an error, not a skip


def test_the_recipe_sft_stage_fine_tunes_for_its_epochs_on_its_own_questions(math_qa, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text("".join('{"prompt": "q", "completion": "a"}\n' for _ in range(20)))
    overrides = math_qa._sft_overrides(tmp_path, type("Args", (), {"sft_epochs": 3}))
    # 3 epochs of 20 rows at math_qa.yaml's global batch of 8: 60 / 8 -> 8 steps
    assert overrides[:3] == ["loss.type=sft", f"data.path={tmp_path / 'data' / 'sft.jsonl'}", "train.steps=8"]
