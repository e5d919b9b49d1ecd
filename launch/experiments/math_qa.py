"""The fusion experiment of docs/EXPERIMENT.md: a real SmolLM2-135M-Instruct pivot fused with Gemma-3-270M and
Qwen2.5-Coder-0.5B-Instruct (three different tokenizers) on BIG-bench elementary_math_qa, InfiFPO against DPO, IPO
and WRPO, and InfiFPO with one strategy switched off at a time. One command per stage, run from the repo root:

    python launch/experiments/math_qa.py prepare   # questions -> pairs, the pivot's own answers (WRPO), conversion
    python launch/experiments/math_qa.py score     # pivot init + both sources score every pair (resumable)
    python launch/experiments/math_qa.py train     # every method x seed (a finished run is skipped)

The paper's recipe (docs/recipe.md): ``prepare --sft-questions N`` keeps the first N training questions for an SFT
stage (data/sft.jsonl, TRL's prompt/completion rows); ``train`` then first fine-tunes the pivot on them (run
``sft-seed{seed}``, ``--sft-epochs``) and starts every preference method of that seed from its checkpoint, on the
other questions' pairs.
    python launch/experiments/math_qa.py report    # table, curves (PNG), results.json -> docs/experiment/

Everything lands in ``--work`` (default runs/math_qa); the report goes to docs/experiment/. Models come from pip
packages (infifpo_mcore/packaged_models.py), the questions from the bigbench source archive (launch/prepare_data.py).

Held-out metric: multiple-choice accuracy by the model's own likelihood (lm-eval's ``acc``: the choice whose answer
sentence has the highest summed log-prob wins; ``acc_norm``: the highest per-token mean). Each held-out question
becomes one pair per wrong choice, so the trainer's evaluation dumps (logging.eval_rows) hold every choice's log-prob.
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


def _pivot_answers(questions: list[dict], *, samples: int, seed: int) -> dict[str, str]:
    """WRPO's y_wt: the pivot's own sampled answer (its first line) where one of ``samples`` picks the correct choice.
    The pivot is shown the choices here (the training prompt has none): a 135M model rarely finds a MathQA answer
    unaided, and y_wt is meant to be the pivot's own wording of a good answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    directory = packaged_model_dir(PIVOT)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).eval()
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
        print(f"  pivot answers: {start + len(group)}/{len(questions)} questions, {len(found)} answered correctly",
              flush=True)
    return found


def prepare(args) -> None:
    started = time.perf_counter()
    work = args.work
    from infifpo_mcore.tokenization import build_tokenizer

    pivot_dir = packaged_model_dir(PIVOT)
    for name in SOURCES:
        print(f"{name}: {packaged_model_dir(name)}", flush=True)
    tokenizer = build_tokenizer(type="hf", path=str(pivot_dir / "tokenizer.json"), chat_template=None)
    with tempfile.TemporaryDirectory() as folder:
        task = prepare_data.read_task(args.archive or prepare_data.download_archive(Path(folder)))
    questions = _questions(task, seed=args.seed, count=args.train_questions + args.heldout_questions,
                           tokenizer=tokenizer, max_tokens=args.seq_length)
    train, heldout = questions[:args.train_questions], questions[args.train_questions:]
    sft, train = train[:args.sft_questions], train[args.sft_questions:]
    if sft:  # the recipe's SFT stage: the correct answer as the completion (TRL's SFT rows)
        _write_jsonl(work / "data" / "sft.jsonl", [
            {"id": question["question"], "prompt": question["prompt"],
             "completion": answer_sentence(question["correct"]), "canary": task["canary"]} for question in sft])
    rng = random.Random(args.seed)
    pivot_answers = _pivot_answers(train, samples=args.pivot_samples, seed=args.seed)
    train_rows = []
    for question in train:
        row = _pair(question, rng.choice([c for c in question["choices"] if c != question["correct"]]),
                    canary=task["canary"])
        # WRPO's own-model chosen response; where no sample was right, the source-side chosen stands in (counted)
        answer = pivot_answers.get(question["question"], row["chosen"][0]["content"])
        row["chosen_pivot"] = [{"role": "assistant", "content": answer}]
        if answer == row["rejected"][0]["content"]:
            row["chosen_pivot"] = row["chosen"]
        train_rows.append(row)
    heldout_rows = [_pair(question, wrong, canary=task["canary"])
                    for question in heldout for wrong in question["choices"] if wrong != question["correct"]]
    for row in heldout_rows:  # WRPO reads a chosen_pivot in every row; held-out metrics never use it
        row["chosen_pivot"] = row["chosen"]
    _write_jsonl(work / "data" / "train_pairs.jsonl", train_rows)
    _write_jsonl(work / "data" / "heldout_pairs.jsonl", heldout_rows)
    facts = {"sft_questions": len(sft), "train_questions": len(train), "heldout_questions": len(heldout),
             "heldout_pairs": len(heldout_rows),
             "pivot_correct_samples": len(pivot_answers), "pivot_samples_per_question": args.pivot_samples,
             "seq_length": args.seq_length, "seed": args.seed}
    (work / "data" / "facts.json").write_text(json.dumps(facts, indent=2))
    print(json.dumps(facts), flush=True)
    checkpoint = work / "pivot_mcore"
    if not (checkpoint / "latest").is_file():
        subprocess.run([sys.executable, str(REPO / "checkpoints_tools" / "hf_to_mcore.py"), "--hf", str(pivot_dir),
                        "--out", str(checkpoint), "--tp", "1", "--pp", "1"], check=True)
    _stage_time(work, "prepare", time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------------
# score
def _score_config(work: Path, split: str, name: str, path: Path, chat_template: str | None) -> list[str]:
    model = (f"sources.models=[{{name: {name}, path: {path}, tokenizer: {{type: hf, path: null, "
             f"chat_template: {chat_template or 'null'}}}, precision: auto}}]")
    return [f"data.path={work / 'data' / f'{split}_pairs.jsonl'}", model,
            f"sources.output={work / 'scores' / name / f'{split}.jsonl'}", "sources.batch_tokens=4096"]


def score(args) -> None:
    """Each model scores each split on its own (own cache, resumable); then the pivot init's sums become ref_* and
    the sources' lists fuse_* of one file per split."""
    from infifpo_mcore.sources import score_sources

    started = time.perf_counter()
    work = args.work
    templates = {PIVOT: None, "gemma-3-270m": "plain", "qwen2.5-coder-0.5b-instruct": None}
    for split in ("train", "heldout"):
        for name in (PIVOT, *SOURCES):
            begun = time.perf_counter()
            cfg = load_config(path=None, overrides=_score_config(work, split, name, packaged_model_dir(name),
                                                                 templates[name]))
            score_sources(cfg)
            _stage_time(work, f"score/{name}/{split}", time.perf_counter() - begun)
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


# ---------------------------------------------------------------------------------------------------------------------
# train
def _run_dir(work: Path, method: str, seed: int) -> Path:
    return work / "runs" / f"{method}-seed{seed}"


def _sft_overrides(work: Path, args) -> list[str]:
    """The recipe's SFT stage: the converted pivot fine-tuned on data/sft.jsonl for --sft-epochs epochs, saved."""
    rows = len(_read_jsonl(work / "data" / "sft.jsonl"))
    batch = load_config(path=CONFIG).train.global_batch_size
    steps = max(-(-args.sft_epochs * rows // batch), 2)
    return ["loss.type=sft", f"data.path={work / 'data' / 'sft.jsonl'}", f"train.steps={steps}",
            f"train.eval_interval={steps}", "logging.eval_rows=false"]


def train(args) -> None:
    work = args.work
    facts = json.loads((work / "data" / "facts.json").read_text())
    recipe = (work / "data" / "sft.jsonl").is_file()
    for seed in args.seeds:
        for method in (["sft"] if recipe else []) + args.methods:
            run_dir = _run_dir(work, method, seed)
            if (run_dir / "done.json").is_file():
                print(f"{run_dir.name}: done already", flush=True)
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            # The recipe's preference stages start from the SFT run's checkpoint (a new run from its weights)
            start = _run_dir(work, "sft", seed) / "checkpoints" if recipe and method != "sft" else work / "pivot_mcore"
            overrides = [f"run_dir={run_dir}", f"checkpoint.load={start}",
                         f"data.path={work / 'data' / 'train.jsonl'}",
                         f"data.eval_path={work / 'data' / 'heldout.jsonl'}",
                         f"model.seq_length={facts['seq_length']}", f"train.seed={seed}"]
            if method == "sft":
                overrides += [*_sft_overrides(work, args), f"checkpoint.save={run_dir / 'checkpoints'}"]
            else:
                overrides += METHODS[method]
            overrides += args.override
            if method == args.methods[0] and seed == args.seeds[0]:
                overrides.append("train.eval_on_start=true")  # the pivot before training: the same for every run
            command = ["torchrun", "--nproc_per_node", "1", str(REPO / "launch" / "pretrain_infifpo.py"),
                       "--config", str(CONFIG), *overrides]
            print(f"{run_dir.name}: {' '.join(command[4:])}", flush=True)
            begun = time.perf_counter()
            run_dir.mkdir(parents=True)
            with (run_dir / "train.log").open("w") as log:
                subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            seconds = time.perf_counter() - begun
            (run_dir / "done.json").write_text(json.dumps({"wall_seconds": round(seconds, 1), "command": command}))
            print(f"{run_dir.name}: {seconds:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# report
def multiple_choice(rows: list[dict], dump: list[dict]) -> dict[str, float]:
    """Held-out multiple-choice accuracy from one evaluation dump: per question, the correct answer against its wrong
    choices (one pair each); ``acc`` by summed log-prob, ``acc_norm`` by per-token mean. Ties count as wrong."""
    by_id = {str(entry["id"]): entry for entry in dump}
    questions: dict[str, list[dict]] = {}
    for row in rows:
        questions.setdefault(row["question"], []).append(by_id[str(row["id"])])
    sums = means = 0
    for pairs in questions.values():
        sums += all(p["policy_chosen_logps"] > p["policy_rejected_logps"] for p in pairs)
        means += all(p["policy_chosen_logps"] / p["policy_chosen_lengths"]
                     > p["policy_rejected_logps"] / p["policy_rejected_lengths"] for p in pairs)
    return {"acc": sums / len(questions), "acc_norm": means / len(questions)}


def _scorer_accuracy(work: Path) -> dict[str, dict[str, float]]:
    """The same multiple-choice accuracy for the pivot init and each source, from their held-out scores (HF)."""
    result = {}
    for name in (PIVOT, *SOURCES):
        rows = _read_jsonl(work / "scores" / name / "heldout.jsonl")
        dump = [{"id": row["id"],
                 **{f"policy_{side}_logps": row[f"fuse_{side}_logps"][0] for side in ("chosen", "rejected")},
                 **{f"policy_{side}_lengths": row[f"fuse_{side}_logps"][0] / row[f"fuse_mean_{side}_logps"][0]
                    for side in ("chosen", "rejected")}}
                for row in rows]
        result[name] = multiple_choice(rows, dump)
    return result


def _mean_spread(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2


def report(args) -> None:
    work, out = args.work, args.out
    out.mkdir(parents=True, exist_ok=True)
    heldout = _read_jsonl(work / "data" / "heldout.jsonl")
    facts = json.loads((work / "data" / "facts.json").read_text())
    curves: dict[str, dict[int, list[dict]]] = {}
    finals: dict[str, list[dict]] = {}
    walls: dict[str, list[float]] = {}
    start_point = None
    for run_dir in sorted((work / "runs").glob("*-seed*")):
        if not (run_dir / "done.json").is_file():
            continue
        method = run_dir.name.rsplit("-seed", 1)[0]
        if method not in METHODS:  # the recipe's SFT stage: its held-out pairs are not evaluated as choices
            continue
        metrics = {entry["step"]: entry for entry in map(json.loads, (run_dir / "metrics.jsonl").open())}
        for dump_path in sorted((run_dir / "eval_rows").glob("step_*.jsonl")):
            step = int(dump_path.stem.split("_")[1])
            dump = _read_jsonl(dump_path)
            point = {"step": step, **multiple_choice(heldout, dump),
                     "policy_margin": sum(row["policy_margin"] for row in dump) / len(dump),
                     "policy_chosen_logps": sum(row["policy_chosen_logps"] for row in dump) / len(dump)}
            point.update({key: metrics[step][key] for key in ("eval/rewards/margins", "eval/rewards/accuracies")
                          if key in metrics.get(step, {})})
            if step == 0:
                start_point = point
            else:
                curves.setdefault(method, {}).setdefault(step, []).append(point)
        last = max(curves.get(method, {0: None}))
        finals.setdefault(method, []).append(curves[method][last][-1] | {"train_loss_last": metrics[last]["loss"]})
        walls.setdefault(method, []).append(json.loads((run_dir / "done.json").read_text())["wall_seconds"])
    sources = _scorer_accuracy(work)
    results = {"facts": facts, "pivot_before_training": start_point, "scorers_on_heldout": sources,
               "final": finals, "wall_seconds": walls,
               "stage_seconds": json.loads((work / "stage_times.json").read_text())}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| method | seeds | held-out acc | held-out acc_norm | held-out policy margin (nats/token) | "
             "held-out chosen log-prob (sum) | held-out reward acc | wall per run |", "|---|---|---|---|---|---|---|---|"]
    if start_point:
        lines.append(f"| pivot before training | - | {start_point['acc']:.3f} | {start_point['acc_norm']:.3f} | "
                     f"{start_point['policy_margin']:+.3f} | {start_point['policy_chosen_logps']:.1f} | - | - |")
    for method in METHODS:
        if method not in finals:
            continue
        cells = []
        for key, form in (("acc", ".3f"), ("acc_norm", ".3f"), ("policy_margin", "+.3f"),
                          ("policy_chosen_logps", ".1f"), ("eval/rewards/accuracies", ".3f")):
            mean, spread = _mean_spread([run[key] for run in finals[method]])
            cells.append(f"{mean:{form}} ± {spread:{form.lstrip('+')}}" if len(finals[method]) > 1
                         else f"{mean:{form}}")
        wall = sum(walls[method]) / len(walls[method])
        lines.append(f"| {method} | {len(finals[method])} | {' | '.join(cells)} | {wall / 60:.1f} min |")
    lines += ["", "| scorer (cached scores) | held-out acc | held-out acc_norm |", "|---|---|---|"]
    lines += [f"| {name} | {value['acc']:.3f} | {value['acc_norm']:.3f} |" for name, value in sources.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(curves, start_point, out / "curves.png")


def _plot(curves: dict, start_point: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    panels = (("acc", "held-out multiple-choice accuracy (sum log-prob; chance 0.2)"),
              ("acc_norm", "held-out multiple-choice accuracy (per-token mean)"),
              ("policy_margin", "held-out policy margin, chosen - rejected (nats/token)"),
              ("policy_chosen_logps", "held-out chosen log-prob (sum over the answer)"),
              ("eval/rewards/margins", "held-out reward margin (each method's own reward)"),
              ("eval/rewards/accuracies", "held-out reward accuracy (each method's own reward)"))
    for axis, (key, title) in zip(axes.flat, panels):
        for method, by_step in curves.items():
            steps = sorted(by_step)
            values = [sum(p[key] for p in by_step[s]) / len(by_step[s]) for s in steps]
            if start_point and key in start_point and not key.startswith("eval/rewards"):
                steps, values = [0, *steps], [start_point[key], *values]
            axis.plot(steps, values, marker="o", label=method)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("prepare", "score", "train", "report"))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "math_qa")
    parser.add_argument("--archive", type=Path, help="bigbench-1.0.0.tar.gz (downloaded with pip when omitted)")
    parser.add_argument("--seed", type=int, default=2505, help="question split and pair sampling")
    parser.add_argument("--train-questions", type=int, default=192,
                        help="training questions, the SFT stage's (--sft-questions) among them")
    parser.add_argument("--sft-questions", type=int, default=0,
                        help="prepare: the first N training questions go to an SFT stage (0: no SFT stage)")
    parser.add_argument("--sft-epochs", type=int, default=3, help="train: epochs of the SFT stage (the paper's 3)")
    parser.add_argument("--heldout-questions", type=int, default=32)
    parser.add_argument("--pivot-samples", type=int, default=4, help="pivot answers sampled per training question")
    parser.add_argument("--seq-length", type=int, default=160, help="pivot tokens, prompt + longest answer")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1234])
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides for every training run")
    parser.add_argument("--out", type=Path, default=REPORT_DIR)
    args = parser.parse_args()
    args.work = args.work.resolve()
    os.chdir(REPO)
    {"prepare": prepare, "score": score, "train": train, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
