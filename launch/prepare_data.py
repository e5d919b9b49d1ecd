"""Build the bundled tiny preference dataset from BIG-bench ``elementary_math_qa`` (MathQA word problems with one
correct choice among several).

Run from the repository root (needs network access to PyPI for the download, ~358 MB, about a minute):

    python launch/prepare_data.py

or, with the source archive already downloaded (``pip download --no-deps --no-binary :all: bigbench==1.0.0``):

    python launch/prepare_data.py --archive bigbench-1.0.0.tar.gz

Each row is in TRL's conversational form: ``prompt`` = the question as one user message, ``chosen`` = the correct
choice as a short answer sentence, ``rejected`` = one wrong choice, as assistant messages. Questions are shuffled
with ``--seed``; the first ``--train-rows`` whose prompt + longer answer fit ``--max-tokens`` Mistral tokens go to
``launch/data/tiny_prefs_train.jsonl``, the next ``--eval-rows`` to ``launch/data/tiny_prefs_eval.jsonl``. The same
archive and arguments always give the same files. BIG-bench asks that its data be filterable from training corpora,
so every row carries the task's canary string in a ``canary`` field (ignored by the loader).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from infifpo_mcore.tokenization import build_tokenizer  # noqa: E402

TASK_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/elementary_math_qa/question_only/task.json"
# Choices are numbers, money or ratios; the source also holds a few garbled ones (e.g. "[' 15'") and
# "none of these", which make poor answers.
CLEAN_CHOICE = re.compile(r"^[\w$%.,/: -]+$")


def download_archive(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "bigbench==1.0.0", "-d", str(folder)], check=True)
    return folder / "bigbench-1.0.0.tar.gz"


def read_task(archive: Path) -> dict:
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.extractfile(TASK_MEMBER)
        if member is None:
            raise SystemExit(f"{archive} has no {TASK_MEMBER}")
        return json.load(member)


def usable_choice(choice: str) -> bool:
    return bool(CLEAN_CHOICE.match(choice)) and "none" not in choice.lower()


def build_rows(task: dict, *, seed: int, count: int, max_tokens: int) -> list[dict]:
    tokenizer = build_tokenizer(type="sentencepiece", path="pkg://mistral_common/data/tokenizer.model.v1",
                                chat_template="mistral")
    rng = random.Random(seed)
    order = list(range(len(task["examples"])))
    rng.shuffle(order)
    rows = []
    for index in order:
        example = task["examples"][index]
        correct = [choice for choice, score in example["target_scores"].items() if score == 1]
        wrong = sorted(choice for choice, score in example["target_scores"].items()
                       if score == 0 and usable_choice(choice))
        if len(correct) != 1 or not usable_choice(correct[0]) or not wrong:
            continue
        prompt = [{"role": "user", "content": example["input"].strip()}]
        chosen = f"The answer is {correct[0].strip()}."
        rejected = f"The answer is {rng.choice(wrong).strip()}."
        longest = max(len(tokenizer.encode_response(text, prompt=prompt)) for text in (chosen, rejected))
        if len(tokenizer.encode_prompt(prompt)) + longest > max_tokens or chosen == rejected:
            continue
        rows.append({"id": f"elementary_math_qa/question_only/{index}", "prompt": prompt,
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}],
                     "canary": task["canary"]})
        if len(rows) == count:
            return rows
    raise SystemExit(f"only {len(rows)} usable questions, {count} wanted")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, help="bigbench-1.0.0.tar.gz (downloaded with pip when omitted)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "launch" / "data")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train-rows", type=int, default=384)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=200, help="prompt + longer answer, Mistral tokens")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        task = read_task(args.archive or download_archive(Path(folder)))
    rows = build_rows(task, seed=args.seed, count=args.train_rows + args.eval_rows, max_tokens=args.max_tokens)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "tiny_prefs_train.jsonl", rows[:args.train_rows])
    write_jsonl(args.out_dir / "tiny_prefs_eval.jsonl", rows[args.train_rows:])


if __name__ == "__main__":
    main()
