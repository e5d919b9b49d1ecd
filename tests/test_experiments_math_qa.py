"""The fusion experiment's own logic (launch/experiments/math_qa.py): question filtering, the answer check for the
SFT model's generations, the held-out choice scorer and multiple-choice accuracy, and the statistics of the report.
The stages themselves run real models for an hour and more; docs/EXPERIMENT.md records their output."""

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


def test_a_question_is_won_when_its_correct_choice_beats_every_other(math_qa):
    rows = [
        # q0: correct (index 2) above all four by sum and by mean
        {"question": "q0", "correct": 2, "choice_logps": [[-8.0, 4], [-9.0, 4], [-4.0, 4], [-8.0, 4], [-7.0, 4]]},
        # q1: a tie with choice 0 is not a win
        {"question": "q1", "correct": 1, "choice_logps": [[-4.0, 4], [-4.0, 4], [-9.0, 4], [-9.0, 4], [-9.0, 4]]},
        # q2: a short wrong answer wins by sum (-5 > -6), the correct one per token (-1 > -2.5)
        {"question": "q2", "correct": 0, "choice_logps": [[-6.0, 6], [-5.0, 2], [-9.0, 4], [-9.0, 4], [-9.0, 4]]},
    ]
    assert math_qa.choice_wins(rows) == {"q0": (True, True), "q1": (False, False), "q2": (False, True)}
    # the margin: the correct answer's per-token log-prob minus the wrong ones' mean, e.g. q2: -1 - (-2.5 - 3 * 2.25) / 4
    margins = math_qa.choice_margins(rows)
    assert margins == {"q0": pytest.approx(-1.0 + 8.0 / 4), "q1": pytest.approx(-1.0 + 7.75 / 4),
                       "q2": pytest.approx(-1.0 + 9.25 / 4)}


def test_choices_are_scored_as_whole_sequences_are(math_qa):
    """The KV-cached choice scorer against each choice scored as one full sequence, on a tiny random Llama (random
    weights: any slip in positions or padding moves the sums)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(type="sentencepiece", path="pkg://mistral_common/data/tokenizer.model.v1",
                                chat_template="mistral")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    question = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "choices": ["5", "6", "17 %", "1/2", "0"],
                "correct": "5"}
    scored = math_qa.choice_logps(model, tokenizer, question)
    prompt = tokenizer.encode_prompt(question["prompt"])
    for choice, (total, count) in zip(question["choices"], scored, strict=True):
        answer = tokenizer.encode_response(math_qa.answer_sentence(choice), prompt=question["prompt"])
        with torch.no_grad():
            logps = model(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
        assert count == len(answer)
        assert total == pytest.approx(sum(logps[len(prompt) + i - 1, token].item()
                                          for i, token in enumerate(answer)), abs=1e-4)
    assert len({count for _, count in scored}) > 1  # answers of different lengths: the padding is exercised


def test_the_recipe_sft_stage_fine_tunes_for_its_epochs_on_its_own_questions(math_qa, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text("".join('{"prompt": "q", "completion": "a"}\n' for _ in range(20)))
    overrides = math_qa._sft_overrides(tmp_path, type("Args", (), {"sft_epochs": 3}))
    # 3 epochs of 20 rows at math_qa.yaml's global batch of 8: 60 / 8 -> 8 steps
    assert overrides[:3] == ["loss.type=sft", f"data.path={tmp_path / 'data' / 'sft.jsonl'}", "train.steps=8"]


def test_the_bootstrap_interval_covers_the_mean_and_tells_a_real_difference_from_none(math_qa):
    rng = random.Random(0)
    no_difference = [rng.choice([-1, 0, 0, 1]) for _ in range(400)]
    mean, low, high, p = math_qa.bootstrap_interval(no_difference)
    assert low < mean < high and low < 0 < high and p > 0.05
    clear = [1] * 60 + [0] * 340  # 15 points on 400 paired questions, none the other way
    mean, low, high, p = math_qa.bootstrap_interval(clear)
    assert mean == pytest.approx(0.15) and 0 < low < 0.15 < high and p < 0.001
    # [seeds, questions] is averaged over the seeds first: the interval is over questions
    assert math_qa.bootstrap_interval([[1, 0] * 50, [0, 1] * 50])[:3] == (0.5, 0.5, 0.5)


def test_one_point_needs_the_questions_mcnemar_says(math_qa):
    a = [True] * 20 + [False] * 80
    b = [False] * 10 + [True] * 10 + [False] * 80  # disagree on 10 of 100 questions
    # (1.96 + 0.8416)^2 * 0.1 / 0.01^2 = 7848.96
    assert math_qa.questions_for_one_point(a, b) == 7849
    assert math_qa.questions_for_one_point(a, a) == 0


def test_a_preference_stage_runs_its_epochs_of_the_pairs(math_qa, tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"prompt": "q"}\n' * 96)
    assert math_qa._steps(rows, 1) == 12 and math_qa._steps(rows, 2) == 24
