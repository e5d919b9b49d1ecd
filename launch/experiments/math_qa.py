"""The fusion experiment of docs/EXPERIMENT.md, as the paper's recipe: a real SmolLM2-135M-Instruct pivot
fine-tuned (SFT) on one half of the training questions, then DPO, IPO, WRPO and InfiFPO (mean and max-margin fusion of
Gemma-3-270M and Qwen2.5-Coder-0.5B-Instruct: three different tokenizers) from that SFT checkpoint on the other half,
on BIG-bench elementary_math_qa. One command per stage, run from the repo root:

    python launch/experiments/math_qa.py prepare   # questions -> SFT rows, pairs, held-out choices; conversion
    python launch/experiments/math_qa.py score     # pivot init + both sources score every split (resumable)
    python launch/experiments/math_qa.py train     # per seed: SFT, then each method from it (done runs skipped)
    python launch/experiments/math_qa.py train --seeds 7 11 --methods dpo infifpo   # more seeds
    python launch/experiments/math_qa.py report    # table with confidence intervals, curves, results.json

Everything lands in ``--work`` (default runs/math_qa); the report goes to docs/experiment/. Models come from pip
packages (infifpo_mcore/packaged_models.py), the questions from the bigbench source archive (launch/prepare_data.py).

Held-out metric: multiple-choice accuracy by the model's own likelihood (lm-eval's ``acc``: the choice whose answer
sentence has the highest summed log-prob wins; ``acc_norm``: the highest per-token mean) over every choice of
--heldout-questions questions, scored once at the end of each run by the trained weights themselves (the run's
checkpoint exported to HF, every choice scored by ``score_choices``: prompt once, KV cache per answer). Curves come
from the trainer's evaluations of a smaller slice (--curve-questions, one pair each) during the preference stage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))

import prepare_data  # noqa: E402  (the bigbench reader of the bundled data)

from infifpo_mcore.config import load_config  # noqa: E402
from infifpo_mcore.packaged_models import packaged_model_dir  # noqa: E402
from infifpo_mcore.sources import export_megatron_source  # noqa: E402

PIVOT = "smollm2-135m-instruct"
SOURCES = ("gemma-3-270m", "qwen2.5-coder-0.5b-instruct")
CONFIG = REPO / "launch" / "experiments" / "math_qa.yaml"
REPORT_DIR = REPO / "docs" / "experiment"

# name -> overrides of math_qa.yaml. Each method keeps its usual scale: DPO/IPO/WRPO on summed log-probs with
# beta 0.1 (TRL's default; IPO's tau), InfiFPO on per-token means with the paper's beta 2.5; the ablations switch one
# InfiFPO strategy and keep everything else.
METHODS = {
    "dpo": ["loss.type=dpo", "loss.beta=0.1", "loss.length_norm=false"],
    "ipo": ["loss.type=ipo", "loss.beta=0.1", "loss.length_norm=true"],
    "wrpo": ["loss.type=wrpo", "loss.beta=0.1", "loss.length_norm=false", "loss.wrpo_alpha=0.5"],
    "infifpo": ["loss.type=infifpo"],
    "infifpo-no-length-norm": ["loss.type=infifpo", "loss.length_norm=false"],
    "infifpo-no-clip": ["loss.type=infifpo", "loss.clip=false"],
    "infifpo-max-margin": ["loss.type=infifpo", "loss.fusion=max_margin"],
}
RECIPE_METHODS = ("dpo", "ipo", "wrpo", "infifpo", "infifpo-max-margin")  # the paper's table; ablations on request


def _stage_time(work: Path, stage: str, seconds: float) -> None:
    path = work / "stage_times.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[stage] = round(seconds, 1)
    path.write_text(json.dumps(times, indent=2))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# prepare
def _questions(task: dict, *, seed: int, count: int, tokenizer, max_tokens: int) -> list[dict]:
    """``count`` shuffled questions with exactly 5 usable choices (one correct) whose prompt + longest answer fit
    ``max_tokens`` pivot tokens."""
    rng = random.Random(seed)
    order = list(range(len(task["examples"])))
    rng.shuffle(order)
    picked = []
    for index in order:
        scores = task["examples"][index]["target_scores"]
        choices = [choice.strip() for choice in scores]
        correct = [choice.strip() for choice, score in scores.items() if score == 1]
        if len(scores) != 5 or len(correct) != 1 or len(set(choices)) != 5:
            continue
        if not all(prepare_data.usable_choice(choice) for choice in choices):
            continue
        prompt = [{"role": "user", "content": task["examples"][index]["input"].strip()}]
        longest = max(len(tokenizer.encode_response(answer_sentence(choice), prompt=prompt))
                      for choice in choices)
        if len(tokenizer.encode_prompt(prompt)) + longest > max_tokens:
            continue
        picked.append({"question": f"elementary_math_qa/question_only/{index}", "prompt": prompt,
                       "choices": choices, "correct": correct[0]})
        if len(picked) == count:
            return picked
    raise SystemExit(f"only {len(picked)} usable questions, {count} wanted")


def answer_sentence(choice: str) -> str:
    return f"The answer is {choice}."


def _pair(question: dict, rejected: str, *, canary: str) -> dict:
    return {"id": f"{question['question']}/{question['choices'].index(rejected)}",
            "question": question["question"], "prompt": question["prompt"],
            "chosen": [{"role": "assistant", "content": answer_sentence(question["correct"])}],
            "rejected": [{"role": "assistant", "content": answer_sentence(rejected)}],
            "canary": canary}


def _mentions(text: str, choice: str) -> bool:
    """``choice`` appears in ``text`` (spaces ignored, case-folded), not as part of a longer number."""
    pattern = r"(?<![\d.])" + re.escape(re.sub(r"\s+", "", choice.lower())) + r"(?![\d])"
    return re.search(pattern, re.sub(r"\s+", "", text.lower())) is not None


def _with_choices(question: dict) -> list[dict]:
    text = question["prompt"][0]["content"] + "\nChoices: " + "; ".join(question["choices"])
    return [{"role": "user", "content": text + "\nAnswer with one of the choices."}]


def picks_correct(generation: str, *, choices: list[str], correct: str) -> bool:
    """The generation's first line names the correct choice and no other."""
    line = generation.strip().split("\n")[0]
    return _mentions(line, correct) and not any(_mentions(line, c) for c in choices if c != correct)


def _pivot_answers(questions: list[dict], *, model_dir: Path, samples: int, seed: int) -> dict[str, str]:
    """WRPO's y_wt: the target's own sampled answer (its first line) where one of ``samples`` picks the correct
    choice; the target is the SFT model (``model_dir``, a HF export), as in WRPO. It is shown the choices here (the
    training prompt has none): a 135M model rarely finds a MathQA answer unaided, and y_wt is meant to be the
    target's own wording of a good answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir(PIVOT))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    found = {}
    batch = 16
    for start in range(0, len(questions), batch):
        group = questions[start:start + batch]
        texts = [tokenizer.apply_chat_template(_with_choices(q), tokenize=False, add_generation_prompt=True)
                 for q in group]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=24,
                                 num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
        generated = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for offset, question in enumerate(group):
            for text in generated[offset * samples:(offset + 1) * samples]:
                if picks_correct(text, choices=question["choices"], correct=question["correct"]):
                    found[question["question"]] = text.strip().split("\n")[0].strip()
                    break
        print(f"  own answers: {start + len(group)}/{len(questions)} questions, {len(found)} answered correctly",
              flush=True)
    return found


def prepare(args) -> None:
    """Questions split three ways (SFT, preference, held-out), their rows, and the converted pivot."""
    started = time.perf_counter()
    work = args.work
    from infifpo_mcore.tokenization import build_tokenizer

    pivot_dir = packaged_model_dir(PIVOT)
    for name in SOURCES:
        print(f"{name}: {packaged_model_dir(name)}", flush=True)
    tokenizer = build_tokenizer(type="hf", path=str(pivot_dir / "tokenizer.json"), chat_template=None)
    with tempfile.TemporaryDirectory() as folder:
        task = prepare_data.read_task(args.archive or prepare_data.download_archive(Path(folder)))
    questions = _questions(task, seed=args.seed,
                           count=args.sft_questions + args.train_questions + args.heldout_questions,
                           tokenizer=tokenizer, max_tokens=args.seq_length)
    sft = questions[:args.sft_questions]
    train = questions[args.sft_questions:args.sft_questions + args.train_questions]
    heldout = questions[args.sft_questions + args.train_questions:]
    # the SFT stage: the correct answer as the completion (TRL's prompt/completion rows)
    _write_jsonl(work / "data" / "sft.jsonl", [
        {"id": question["question"], "prompt": question["prompt"],
         "completion": answer_sentence(question["correct"]), "canary": task["canary"]} for question in sft])
    rng = random.Random(args.seed)
    train_rows = [_pair(question, rng.choice([c for c in question["choices"] if c != question["correct"]]),
                        canary=task["canary"]) for question in train]
    # held-out: every choice scored at the end of each run (score_choices); the curve slice: the first
    # --curve-questions held-out questions, one pair each, evaluated during training
    curve_rows = [_pair(question, rng.choice([c for c in question["choices"] if c != question["correct"]]),
                        canary=task["canary"]) for question in heldout[:args.curve_questions]]
    for row in curve_rows:  # WRPO reads a chosen_pivot in every row; held-out metrics never use it
        row["chosen_pivot"] = row["chosen"]
    _write_jsonl(work / "data" / "train_questions.jsonl", train)
    _write_jsonl(work / "data" / "heldout_questions.jsonl", heldout)
    _write_jsonl(work / "data" / "train_pairs.jsonl", train_rows)
    _write_jsonl(work / "data" / "curve_pairs.jsonl", curve_rows)
    facts = {"sft_questions": len(sft), "train_questions": len(train), "heldout_questions": len(heldout),
             "curve_pairs": len(curve_rows),
             "pivot_samples_per_question": args.pivot_samples, "seq_length": args.seq_length, "seed": args.seed}
    (work / "data" / "facts.json").write_text(json.dumps(facts, indent=2))
    print(json.dumps(facts), flush=True)
    checkpoint = work / "pivot_mcore"
    if not (checkpoint / "latest").is_file():
        subprocess.run([sys.executable, str(REPO / "checkpoints_tools" / "hf_to_mcore.py"), "--hf", str(pivot_dir),
                        "--out", str(checkpoint), "--tp", "1", "--pp", "1"], check=True)
    _stage_time(work, "prepare", time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------------
# score
def _score(work: Path, split: str, name: str, path: Path, *, chat_template: str | None) -> None:
    """One HF model scores data/<split>_pairs.jsonl into scores/<name>/<split>.jsonl (its own cache: resumable)."""
    from infifpo_mcore.sources import score_sources

    model = (f"sources.models=[{{name: {name}, path: {path}, tokenizer: {{type: hf, path: null, "
             f"chat_template: {chat_template or 'null'}}}, precision: auto}}]")
    begun = time.perf_counter()
    score_sources(load_config(path=None, overrides=[
        f"data.path={work / 'data' / f'{split}_pairs.jsonl'}", model,
        f"sources.output={work / 'scores' / name / f'{split}.jsonl'}", "sources.batch_tokens=4096"]))
    _stage_time(work, f"score/{name}/{split}", time.perf_counter() - begun)


def score(args) -> None:
    """The pivot init and each source score the training and curve pairs on their own; the pivot init's sums become
    ref_* and the sources' lists fuse_* of data/train.jsonl and data/curve.jsonl. Then each scores every held-out
    choice (``score_choices``, ``--choices-of``): the table's lines before training."""
    started = time.perf_counter()
    work = args.work
    templates = {PIVOT: None, "gemma-3-270m": "plain", "qwen2.5-coder-0.5b-instruct": None}
    for split in ("train", "curve"):
        for name in (PIVOT, *SOURCES):
            _score(work, split, name, packaged_model_dir(name), chat_template=templates[name])
        by_model = {name: _read_jsonl(work / "scores" / name / f"{split}.jsonl") for name in (PIVOT, *SOURCES)}
        rows = []
        for index, row in enumerate(_read_jsonl(work / "data" / f"{split}_pairs.jsonl")):
            pivot = by_model[PIVOT][index]
            assert pivot["id"] == row["id"], (pivot["id"], row["id"])
            row["ref_chosen_logps"], row["ref_rejected_logps"] = pivot["fuse_chosen_logps"][0], \
                pivot["fuse_rejected_logps"][0]
            for field in ("fuse_chosen_logps", "fuse_rejected_logps", "fuse_mean_chosen_logps",
                          "fuse_mean_rejected_logps"):
                row[field] = [by_model[name][index][field][0] for name in SOURCES]
            rows.append(row)
        _write_jsonl(work / "data" / f"{split}.jsonl", rows)
        print(f"wrote {work / 'data' / f'{split}.jsonl'} ({len(rows)} rows)", flush=True)
    _stage_time(work, "score", time.perf_counter() - started)
    for name in args.choices_of:  # the sources' lines need not wait: `score --choices-of <sources>` any time
        score_choices(work, name, packaged_model_dir(name), chat_template=templates[name])


def choice_logps(model, tokenizer, question: dict) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of each choice's answer sentence after the question, in the model's own
    tokens and chat template (``tokenizer``: a ChatTokenizer, as the trainer and the scorer encode). The prompt runs
    once; its KV cache, repeated per choice, scores the right-padded answers in one batch (padding comes after every
    real token, so causal attention keeps it out)."""
    import warnings

    import torch

    # transformers 5.x renames the argument to `cache`; past_key_values still works there and is the only name of 4.x
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    prompt = tokenizer.encode_prompt(question["prompt"])
    answers = [tokenizer.encode_response(answer_sentence(choice), prompt=question["prompt"])
               for choice in question["choices"]]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        first = out.logits[0, -1].float().log_softmax(-1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(answers))
        ids = torch.full((len(answers), max(map(len, answers))), tokenizer.pad_id, dtype=torch.int64)
        for row, answer in enumerate(answers):
            ids[row, :len(answer)] = torch.tensor(answer)
        rest = model(input_ids=ids, past_key_values=cache, use_cache=True).logits.float().log_softmax(-1)
    return [(float(first[answer[0]]) + sum(float(rest[row, position - 1, answer[position]])
                                           for position in range(1, len(answer))), len(answer))
            for row, answer in enumerate(answers)]


def score_choices(work: Path, name: str, model_dir: Path, *, tokenizer_dir: Path | None = None,
                  chat_template: str | None = None) -> Path:
    """Every held-out question's choices scored by one HF model into scores/<name>/choices.jsonl (skipped when
    there)."""
    import torch
    from transformers import AutoModelForCausalLM

    from infifpo_mcore.tokenization import build_tokenizer

    path = work / "scores" / name / "choices.jsonl"
    if path.is_file():
        return path
    begun = time.perf_counter()
    tokenizer = build_tokenizer(type="hf", path=str((tokenizer_dir or model_dir) / "tokenizer.json"),
                                chat_template=chat_template)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    rows = [{"question": question["question"], "correct": question["choices"].index(question["correct"]),
             "choice_logps": choice_logps(model, tokenizer, question)}
            for question in _read_jsonl(work / "data" / "heldout_questions.jsonl")]
    _write_jsonl(path, rows)
    _stage_time(work, f"choices/{name}", time.perf_counter() - begun)
    return path


def choice_wins(rows: list[dict]) -> dict[str, tuple[bool, bool]]:
    """Per question of ``score_choices``' rows: the correct choice strictly above every other by summed log-prob
    (``acc``) and by per-token mean (``acc_norm``). Ties lose."""
    def wins(values: list[float], correct: int) -> bool:
        return all(values[correct] > value for index, value in enumerate(values) if index != correct)

    return {row["question"]: (wins([total for total, _ in row["choice_logps"]], row["correct"]),
                              wins([total / count for total, count in row["choice_logps"]], row["correct"]))
            for row in rows}


def choice_margins(rows: list[dict]) -> dict[str, float]:
    """Per question of ``score_choices``' rows: the correct answer's per-token log-prob minus the mean of the wrong
    answers' (nats/token). A continuous companion of ``acc_norm``: it moves before a question flips."""
    def margin(means: list[float], correct: int) -> float:
        wrong = [value for index, value in enumerate(means) if index != correct]
        return means[correct] - sum(wrong) / len(wrong)

    return {row["question"]: margin([total / count for total, count in row["choice_logps"]], row["correct"])
            for row in rows}


# ---------------------------------------------------------------------------------------------------------------------
# train
def _run_dir(work: Path, method: str, seed: int) -> Path:
    return work / "runs" / f"{method}-seed{seed}"


def _steps(rows_path: Path, epochs: int) -> int:
    """Optimizer steps for ``epochs`` passes over a file's rows at math_qa.yaml's global batch."""
    batch = load_config(path=CONFIG).train.global_batch_size
    return max(-(-epochs * len(_read_jsonl(rows_path)) // batch), 2)


def _sft_overrides(work: Path, args) -> list[str]:
    """The recipe's SFT stage: the converted pivot fine-tuned on data/sft.jsonl for --sft-epochs epochs, saved."""
    steps = _steps(work / "data" / "sft.jsonl", args.sft_epochs)
    return ["loss.type=sft", f"data.path={work / 'data' / 'sft.jsonl'}", f"train.steps={steps}",
            f"train.eval_interval={steps}", "logging.eval_rows=false"]


def _wrpo_rows(work: Path, seed: int, args) -> Path:
    """WRPO's rows for one seed: the training pairs with y_wt (``chosen_pivot``) sampled from that seed's SFT model,
    the target as in WRPO; where no sample is right, the source-side chosen stands in (counted in the facts)."""
    path = work / "data" / f"train_wrpo-seed{seed}.jsonl"
    if path.is_file():
        return path
    sft = _run_dir(work, "sft", seed)
    questions = _read_jsonl(work / "data" / "train_questions.jsonl")
    answers = _pivot_answers(questions, model_dir=sft / "hf", samples=args.pivot_samples, seed=seed)
    rows = _read_jsonl(work / "data" / "train.jsonl")
    for row in rows:
        row["chosen_pivot"] = [{"role": "assistant", "content": answers.get(row["question"],
                                                                             row["chosen"][0]["content"])}]
    _write_jsonl(path, rows)
    (work / "data" / f"train_wrpo-seed{seed}.facts.json").write_text(json.dumps(
        {"questions": len(questions), "answered_correctly": len(answers), "samples_per_question": args.pivot_samples}))
    return path


def train(args) -> None:
    """Per seed: the SFT stage, then each preference method from its checkpoint. Every run ends with its weights
    scoring every held-out choice (``score_choices`` from its HF export); a preference run's checkpoint and export
    are then deleted."""
    work = args.work
    facts = json.loads((work / "data" / "facts.json").read_text())
    for seed in args.seeds:
        for method in ["sft", *args.methods]:
            run_dir = _run_dir(work, method, seed)
            if (run_dir / "done.json").is_file():
                print(f"{run_dir.name}: done already", flush=True)
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            (work / "scores" / run_dir.name / "choices.jsonl").unlink(missing_ok=True)  # an earlier try's
            start = work / "pivot_mcore" if method == "sft" else _run_dir(work, "sft", seed) / "checkpoints"
            overrides = [f"run_dir={run_dir}", f"checkpoint.load={start}",
                         f"checkpoint.save={run_dir / 'checkpoints'}",
                         f"data.eval_path={work / 'data' / 'curve.jsonl'}",
                         f"model.seq_length={facts['seq_length']}", f"train.seed={seed}"]
            if method == "sft":
                overrides += _sft_overrides(work, args)
            else:
                rows = _wrpo_rows(work, seed, args) if method == "wrpo" else work / "data" / "train.jsonl"
                steps = _steps(rows, args.epochs)
                overrides += [f"data.path={rows}", f"train.steps={steps}", f"train.eval_interval={max(steps // 3, 1)}",
                              "train.eval_on_start=true", *METHODS[method]]
            overrides += args.override
            command = ["torchrun", "--nproc_per_node", "1", str(REPO / "launch" / "pretrain_infifpo.py"),
                       "--config", str(CONFIG), *overrides]
            print(f"{run_dir.name}: {' '.join(command[4:])}", flush=True)
            begun = time.perf_counter()
            run_dir.mkdir(parents=True)
            with (run_dir / "train.log").open("w") as log:
                subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            trained = time.perf_counter() - begun
            export_megatron_source(name=run_dir.name, checkpoint=run_dir / "checkpoints", out_dir=run_dir / "hf")
            score_choices(work, run_dir.name, run_dir / "hf", tokenizer_dir=packaged_model_dir(PIVOT))
            if method != "sft":  # 2.2 GB each; the SFT checkpoint starts the other methods, its HF export WRPO's y_wt
                shutil.rmtree(run_dir / "checkpoints")
                shutil.rmtree(run_dir / "hf")
            (run_dir / "done.json").write_text(json.dumps({
                "wall_seconds": round(trained, 1), "score_seconds": round(time.perf_counter() - begun - trained, 1),
                "command": command}))
            print(f"{run_dir.name}: {trained:.0f} s training, {time.perf_counter() - begun - trained:.0f} s scoring",
                  flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# report
def bootstrap_interval(values, *, resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-question ``values`` ([questions] or [seeds, questions], averaged over seeds first) with the 95 %
    percentile interval and the two-sided p-value of "mean = 0" from resampling the questions."""
    import numpy as np

    per_question = np.asarray(values, dtype=float).reshape(-1, np.shape(values)[-1]).mean(0)
    rng = np.random.default_rng(seed)
    means = per_question[rng.integers(0, per_question.size, (resamples, per_question.size))].mean(1)
    p_value = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return float(per_question.mean()), *np.percentile(means, [2.5, 97.5]).tolist(), p_value


def questions_for_one_point(a, b, *, z_alpha: float = 1.96, z_power: float = 0.8416) -> int:
    """Held-out questions a paired comparison needs to detect a 1-point accuracy difference (alpha 0.05, power 0.8):
    McNemar's normal approximation n = (z_a + z_b)^2 d / 0.01^2, d the measured share of questions on which the two
    disagree."""
    import numpy as np

    discordant = float((np.asarray(a, dtype=bool) != np.asarray(b, dtype=bool)).mean())
    return int(np.ceil((z_alpha + z_power) ** 2 * discordant / 0.01 ** 2))


def _curve_point(dump: list[dict], metrics: dict) -> dict:
    point = {"pair_acc": sum(row["policy_chosen_logps"] > row["policy_rejected_logps"] for row in dump) / len(dump),
             "policy_margin": sum(row["policy_margin"] for row in dump) / len(dump),
             "policy_chosen_logps": sum(row["policy_chosen_logps"] for row in dump) / len(dump)}
    return point | {key: metrics[key] for key in ("eval/rewards/margins", "eval/rewards/accuracies") if key in metrics}


def report(args) -> None:
    import numpy as np

    work, out = args.work, args.out
    out.mkdir(parents=True, exist_ok=True)
    order = [question["question"] for question in _read_jsonl(work / "data" / "heldout_questions.jsonl")]

    def per_question(name: str) -> np.ndarray:  # [3, questions]: acc, acc_norm (0/1), margin (nats/token)
        rows = _read_jsonl(work / "scores" / name / "choices.jsonl")
        wins, margins = choice_wins(rows), choice_margins(rows)
        return np.array([[wins[q][0] for q in order], [wins[q][1] for q in order], [margins[q] for q in order]],
                        dtype=float)

    runs: dict[str, dict[int, np.ndarray]] = {}
    curves: dict[str, dict[int, list[dict]]] = {}
    walls: dict[str, list[float]] = {}
    finals: dict[str, list[dict]] = {}
    for run_dir in sorted((work / "runs").glob("*-seed*")):
        if not (run_dir / "done.json").is_file():
            continue
        method, seed = run_dir.name.rsplit("-seed", 1)
        runs.setdefault(method, {})[int(seed)] = per_question(run_dir.name)
        walls.setdefault(method, []).append(json.loads((run_dir / "done.json").read_text())["wall_seconds"])
        if method == "sft":
            continue
        metrics = {entry["step"]: entry for entry in map(json.loads, (run_dir / "metrics.jsonl").open())}
        points = {int(path.stem.split("_")[1]): _curve_point(_read_jsonl(path), metrics.get(
            int(path.stem.split("_")[1]), {})) for path in sorted((run_dir / "eval_rows").glob("step_*.jsonl"))}
        for step, point in points.items():
            curves.setdefault(method, {}).setdefault(step, []).append(point)
        finals.setdefault(method, []).append(points[max(points)])
    missing = [name for name in (PIVOT, *SOURCES) if not (work / "scores" / name / "choices.jsonl").is_file()]
    if missing:
        print(f"not in the table yet: {', '.join(missing)} (score --choices-of {' '.join(missing)})", flush=True)
    scorers = {name: per_question(name) for name in (PIVOT, *SOURCES) if name not in missing}
    methods = [m for m in ["sft", *METHODS] if m in runs]
    results = {"facts": json.loads((work / "data" / "facts.json").read_text()),
               "stage_seconds": json.loads((work / "stage_times.json").read_text()), "methods": {},
               "scorers": {}, "comparisons": {},
               "wrpo_y_wt": {path.name.split(".")[0]: json.loads(path.read_text())
                             for path in sorted((work / "data").glob("train_wrpo-seed*.facts.json"))}}
    label = {"sft": "SFT", "dpo": "SFT-DPO", "ipo": "SFT-IPO", "wrpo": "SFT-WRPO", "infifpo": "InfiFPO",
             "infifpo-no-length-norm": "InfiFPO, no length norm", "infifpo-no-clip": "InfiFPO, no clipping",
             "infifpo-max-margin": "InfiFPO, max-margin"}
    def cell(interval, form: str) -> str:
        return f"{interval[0]:{form}} ({interval[1]:{form}} to {interval[2]:{form}})"

    forms = {"acc": ".3f", "acc_norm": ".3f", "margin": "+.3f"}
    lines = ["| model | seeds | held-out acc (95 % CI) | held-out acc_norm (95 % CI) | held-out correct-answer margin, "
             "nats/token (95 % CI) | acc per seed | curve slice at the end: pair acc / policy margin / reward acc | "
             "train wall per run |", "|---|---|---|---|---|---|---|---|"]
    for name, table in scorers.items():
        intervals = {metric: bootstrap_interval(table[k])[:3] for k, metric in enumerate(forms)}
        results["scorers"][name] = intervals
        lines.append(f"| {name} (before training{'' if name == PIVOT else ', a source'}) | - | "
                     f"{' | '.join(cell(intervals[m], form) for m, form in forms.items())} | - | - | - |")
    for method in methods:
        seeds = sorted(runs[method])
        stacked = np.stack([runs[method][seed] for seed in seeds])  # [seeds, 3, questions]
        intervals = {metric: bootstrap_interval(stacked[:, k])[:3] for k, metric in enumerate(forms)}
        per_seed = [float(v) for v in stacked[:, 0].mean(-1)]
        curve = "-"
        if method in finals:
            mean = {key: sum(p[key] for p in finals[method]) / len(finals[method])
                    for key in ("pair_acc", "policy_margin", "eval/rewards/accuracies")}
            curve = f"{mean['pair_acc']:.2f} / {mean['policy_margin']:+.3f} / {mean['eval/rewards/accuracies']:.2f}"
        results["methods"][method] = {"seeds": seeds, **intervals, "acc_per_seed": per_seed,
                                      "final_curve_point": finals.get(method), "wall_seconds": walls[method]}
        lines.append(f"| {label[method]} | {len(seeds)} | "
                     f"{' | '.join(cell(intervals[m], form) for m, form in forms.items())} | "
                     f"{', '.join(f'{v:.3f}' for v in per_seed)} | {curve} | "
                     f"{sum(walls[method]) / len(walls[method]) / 60:.1f} min |")
    lines += ["", "| comparison (paired by question, seeds averaged) | acc difference (95 % CI) | p | "
              "acc_norm difference (95 % CI) | p | margin difference (95 % CI) | p | questions for 1 point of acc |",
              "|---|---|---|---|---|---|---|---|"]

    def compare(a: str, b: str) -> None:
        """a - b, paired by question: by seed where both have it, against the one pivot init otherwise."""
        if b == PIVOT:
            seeds = sorted(runs[a])
            first = np.stack([runs[a][s] for s in seeds])
            second = np.repeat(scorers[PIVOT][None], len(seeds), axis=0)
        else:
            seeds = sorted(set(runs[a]) & set(runs[b]))
            first, second = np.stack([runs[a][s] for s in seeds]), np.stack([runs[b][s] for s in seeds])
        key = f"{a} - {b}"
        results["comparisons"][key] = {"seeds": seeds}
        cells = []
        for k, metric in enumerate(forms):
            mean, low, high, p = bootstrap_interval(first[:, k] - second[:, k])
            cells += [cell((mean, low, high), "+.3f"), f"{p:.3f}"]
            results["comparisons"][key][metric] = [mean, low, high, p]
        needed = questions_for_one_point(first[:, 0], second[:, 0])
        results["comparisons"][key]["questions_for_one_point"] = needed
        lines.append(f"| {label.get(a, a)} - {label.get(b, 'pivot before training')} ({len(seeds)} seed"
                     f"{'s' if len(seeds) > 1 else ''}) | {' | '.join(cells)} | {needed:,} |")

    if "sft" in runs and PIVOT in scorers:
        compare("sft", PIVOT)
    for method in methods[1:]:
        compare(method, "sft")
    if {"infifpo", "dpo"} <= set(runs):
        compare("infifpo", "dpo")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot({label[method]: by_step for method, by_step in curves.items()}, out / "curves.png")


def _plot(curves: dict, path: Path) -> None:
    """The curve slice over the preference stage, each method's mean over its seeds (step 0: its SFT model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(24, 4.5))
    panels = (("pair_acc", "curve slice: chosen above rejected (summed log-prob)"),
              ("policy_margin", "curve slice: policy margin, chosen - rejected (nats/token)"),
              ("policy_chosen_logps", "curve slice: chosen log-prob (sum over the answer)"),
              ("eval/rewards/margins", "curve slice: reward margin (each method's own reward)"),
              ("eval/rewards/accuracies", "curve slice: reward accuracy (each method's own reward)"))
    for axis, (key, title) in zip(axes.flat, panels):
        for method, by_step in curves.items():
            steps = [step for step in sorted(by_step) if all(key in p for p in by_step[step])]
            axis.plot(steps, [sum(p[key] for p in by_step[s]) / len(by_step[s]) for s in steps], marker="o",
                      label=method)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("preference step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("prepare", "score", "train", "report"))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "math_qa")
    parser.add_argument("--archive", type=Path, help="bigbench-1.0.0.tar.gz (downloaded with pip when omitted)")
    parser.add_argument("--seed", type=int, default=2505, help="question split and pair sampling")
    parser.add_argument("--sft-questions", type=int, default=96, help="questions of the SFT stage (correct answers)")
    parser.add_argument("--sft-epochs", type=int, default=3, help="train: epochs of the SFT stage (the paper's 3)")
    parser.add_argument("--train-questions", type=int, default=96,
                        help="questions of the preference stage (a pair each)")
    parser.add_argument("--epochs", type=int, default=2, help="train: epochs of the preference stage")
    parser.add_argument("--heldout-questions", type=int, default=200,
                        help="held-out questions, every choice scored once at the end of each run")
    parser.add_argument("--curve-questions", type=int, default=32,
                        help="held-out questions (a pair each) evaluated during training for the curves")
    parser.add_argument("--pivot-samples", type=int, default=4,
                        help="answers sampled from the SFT model per preference question (WRPO's y_wt)")
    parser.add_argument("--seq-length", type=int, default=160, help="pivot tokens, prompt + longest answer")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(RECIPE_METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1234])
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides for every training run")
    parser.add_argument("--out", type=Path, default=REPORT_DIR)
    parser.add_argument("--choices-of", nargs="*", choices=(PIVOT, *SOURCES), default=[PIVOT, *SOURCES],
                        help="score: the models that score every held-out choice")
    args = parser.parse_args()
    args.work = args.work.resolve()
    os.chdir(REPO)
    {"prepare": prepare, "score": score, "train": train, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
