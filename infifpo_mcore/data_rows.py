"""One row's fields -> a validated ``PreferenceRow``: its form (TRL preference, InfiFPO reference, WRPO's authors',
TRL SFT; ``data``'s docstring lists them), its chat messages and its cached scores. Every problem of the row is
collected as ``where field: problem``, not only the first.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field

from infifpo_mcore.tokenization import Message

REF_SUMS = ("ref_chosen_logps", "ref_rejected_logps")
REF_MEANS = ("ref_mean_chosen_logps", "ref_mean_rejected_logps")
FUSE_FIELDS = ("fuse_chosen_logps", "fuse_rejected_logps", "fuse_mean_chosen_logps", "fuse_mean_rejected_logps")
CHOSEN_PIVOT = "chosen_pivot"
SFT_FIELDS = ("completion", "messages")
KNOWN_FIELDS = ("id", "prompt", "chosen", "rejected", CHOSEN_PIVOT, *SFT_FIELDS, *REF_SUMS, *REF_MEANS, *FUSE_FIELDS)
ROLES = ("system", "user", "assistant")


@dataclass
class PreferenceRow:
    id: str | int
    line: int  # its position in reading order: the line number of a JSON lines file, else the row index
    prompt: list[Message]
    chosen: str
    rejected: str | None  # None: an SFT row (prompt/completion or messages)
    cached: dict[str, float | list[float]]
    chosen_pivot: str | None = None  # WRPO's y_wt, when the row has one
    fields: dict = field(default_factory=dict)  # the row as read, every field: what a rewriter (the scorer) keeps
    where: str = ""  # file:LINE or file row INDEX


class RowProblems:
    """Collects ``where field: problem`` strings of rows known by their key (``SourceRow.key``: a line number of a
    JSON lines file); ``sorted()`` orders them by key."""

    def __init__(self):
        self.by_line: list[tuple[int, str]] = []
        self.where: dict[int, str] = {}

    def add(self, line: int, field_name: str, problem: str) -> None:
        self.by_line.append((line, f"{self.where[line]} {field_name}: {problem}"))

    def sorted(self) -> list[str]:
        return [text for _, text in sorted(self.by_line, key=lambda item: item[0])]

    @property
    def lines(self) -> set[int]:
        return {line for line, _ in self.by_line}


def row_key(row: PreferenceRow) -> str:
    """Identity of a row's content (prompt messages, chosen, rejected), independent of its id, position and file
    format: the score cache's key, and what the online sources and the trainer compare to be sure they mean the same
    row."""
    content = json.dumps([row.prompt, row.chosen, row.rejected], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:32]


def _not_unicode(text: str) -> bool:
    """A JSON escape can produce a lone UTF-16 surrogate, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _messages(value: object, name: str, line: int, problems: RowProblems) -> list[Message] | None:
    if not isinstance(value, list) or not value:
        problems.add(line, name, "expected a non-empty string or a non-empty list of messages")
        return None
    before = len(problems.by_line)
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            problems.add(line, f"{name}[{index}]", f"expected {{'role': one of {list(ROLES)}, 'content': str}}")
        elif not isinstance(message.get("content"), str) or not message["content"].strip():
            problems.add(line, f"{name}[{index}].content", "missing or empty")
        elif _not_unicode(message["content"]):
            problems.add(line, f"{name}[{index}].content", "not valid Unicode (a lone surrogate escape)")
    if len(problems.by_line) > before:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value: object, name: str, line: int, problems: RowProblems) -> str | None:
    """A response: a non-empty string or ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(value, str) and value.strip():
        if _not_unicode(value):
            problems.add(line, name, "not valid Unicode (a lone surrogate escape)")
            return None
        return value
    messages = _messages(value, name, line, problems)
    if messages is None:
        return None
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        problems.add(line, name, f"expected exactly one assistant message, got roles {[m['role'] for m in messages]}")
        return None
    return messages[0]["content"]


def _split_conversations(row: dict, line: int, problems: RowProblems) -> tuple[list[Message], str, str] | None:
    """Reference form: the shared leading messages are the prompt; each side must add one assistant message."""
    if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
        problems.add(line, "prompt", "missing (needed when chosen/rejected are strings)")
        return None
    chosen = _messages(row["chosen"], "chosen", line, problems)
    rejected = _messages(row["rejected"], "rejected", line, problems)
    if chosen is None or rejected is None:
        return None
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    answers = {}
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        tail = conversation[shared:]
        if len(tail) != 1 or tail[0]["role"] != "assistant":
            problems.add(line, name, "expected the shared prompt messages followed by one assistant message "
                         f"(got {len(tail)} message(s) after {shared} shared)")
        else:
            answers[name] = tail[0]["content"]
    if shared == 0:
        problems.add(line, "prompt", "missing: chosen and rejected share no leading messages and no prompt is given")
    if shared == 0 or len(answers) != 2:
        return None
    return chosen[:shared], answers["chosen"], answers["rejected"]


def _chosen_pivot(row: dict, prompt: list[Message] | None, line: int, problems: RowProblems) -> str | None:
    """WRPO's y_wt in the form of the row's responses: an answer in TRL rows (``prompt`` given), else a conversation
    that repeats the prompt messages and adds one assistant message."""
    value = row[CHOSEN_PIVOT]
    if "prompt" in row:
        return _answer(value, CHOSEN_PIVOT, line, problems)
    if isinstance(value, str):
        problems.add(line, CHOSEN_PIVOT, "expected a conversation like chosen's (the rows have no prompt field)")
        return None
    conversation = _messages(value, CHOSEN_PIVOT, line, problems)
    if conversation is None or prompt is None:
        return None
    tail = conversation[len(prompt):]
    if conversation[:len(prompt)] != prompt or len(tail) != 1 or tail[0]["role"] != "assistant":
        problems.add(line, CHOSEN_PIVOT, f"expected the {len(prompt)} prompt message(s) chosen and rejected share, "
                     "followed by one assistant message")
        return None
    return tail[0]["content"]


def _check_logp(value: object, name: str, line: int, problems: RowProblems) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(line, name, f"expected a number, got {type(value).__name__}")
    elif not math.isfinite(value):
        problems.add(line, name, f"not finite ({value})")
    elif value > 0:
        problems.add(line, name, f"log-probability must be <= 0, got {value}")
    else:
        return float(value)
    return None


def _scores(value: object, name: str, line: int, problems: RowProblems, *, per_source: bool):
    """One cached score (a number), or one per source (a non-empty list, None in place of each invalid entry)."""
    if not per_source:
        return _check_logp(value, name, line, problems)
    if not isinstance(value, list) or not value:
        problems.add(line, name, "expected a non-empty list of log-probabilities, one per source")
        return None
    return [_check_logp(v, f"{name}[{i}]", line, problems) for i, v in enumerate(value)]


def token_count(*, total_logp: float, mean_logp: float) -> float:
    """A model's token count for a response from its cached sum and mean log-prob: sum / mean, rounded."""
    return float(round(total_logp / mean_logp)) if mean_logp != 0 else math.nan


def _cached_scores(row: dict, line: int, problems: RowProblems) -> dict[str, float | list[float]]:
    values = {name: _scores(row[name], name, line, problems, per_source=name in FUSE_FIELDS)
              for name in (*REF_SUMS, *REF_MEANS, *FUSE_FIELDS) if name in row}
    # group -> fields it also needs (means need their sums; a partly given sums group reports itself)
    for group, needs in ((REF_SUMS, ()), (REF_MEANS, REF_SUMS), (FUSE_FIELDS, ())):
        present = [name for name in group if name in row]
        required = group + (needs if not any(name in row for name in needs) else ())
        for name in required if present else ():
            if name not in row:
                problems.add(line, name, f"missing (needed together with {present[0]})")
    sizes = {name: len(row[name]) for name in FUSE_FIELDS if isinstance(row.get(name), list)}
    first_name, first_size = next(iter(sizes.items()), (None, None))
    for name, size in sizes.items():
        if size != first_size:
            problems.add(line, name, f"{size} entries, but {first_name} has {first_size}")
    for kind in ("chosen", "rejected"):
        checks = [(f"ref_mean_{kind}_logps", values.get(f"ref_{kind}_logps"), values.get(f"ref_mean_{kind}_logps"))]
        sums, means = values.get(f"fuse_{kind}_logps") or [], values.get(f"fuse_mean_{kind}_logps") or []
        # not strict: lists of unequal length were reported above
        checks += [(f"fuse_mean_{kind}_logps[{i}]", total, mean)
                   for i, (total, mean) in enumerate(zip(sums, means, strict=False))]
        for where, total, mean in checks:
            if total is not None and mean is not None and not token_count(total_logp=total, mean_logp=mean) >= 1:
                problems.add(line, where, f"sum {total} / mean {mean} is not a token count >= 1")
    return values


def _prompt(value: object, line: int, problems: RowProblems) -> list[Message] | None:
    """A prompt: a string (one user message), one message, or a list of messages not ending with the assistant's."""
    is_text = isinstance(value, str) and value.strip()
    value = [{"role": "user", "content": value}] if is_text else [value] if isinstance(value, dict) else value
    prompt = _messages(value, "prompt", line, problems)
    if prompt is not None and prompt[-1]["role"] == "assistant":
        problems.add(line, "prompt", "the last prompt message must not be an assistant message")
        return None
    return prompt


def is_sft_row(row: dict) -> bool:
    return "chosen" not in row and any(name in row for name in SFT_FIELDS)


def _sft_row(row: dict, line: int, problems: RowProblems) -> tuple[list[Message] | None, str | None]:
    """TRL's SFT forms: (prompt, response) of ``prompt`` + ``completion``, or of ``messages``."""
    if "messages" in row:
        if "prompt" in row or "completion" in row:
            problems.add(line, "messages", "give either messages or prompt and completion, not both")
            return None, None
        conversation = _messages(row["messages"], "messages", line, problems)
        if conversation is None:
            return None, None
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant" or conversation[-2]["role"] == "assistant":
            problems.add(line, "messages", "expected prompt messages followed by the assistant message to train on "
                         f"(got roles {[m['role'] for m in conversation]})")
            return None, None
        return conversation[:-1], conversation[-1]["content"]
    if "prompt" not in row:
        problems.add(line, "prompt", "missing (needed with completion)")
    prompt = _prompt(row["prompt"], line, problems) if "prompt" in row else None
    return prompt, _answer(row["completion"], "completion", line, problems)


def is_wrpo_authors_row(row: dict) -> bool:
    """SLIT-AI/WRPO's rows: ``chosen`` a list of two assistant messages [y_ws, y_wt] beside a ``prompt``."""
    chosen = row.get("chosen")
    return ("prompt" in row and CHOSEN_PIVOT not in row and isinstance(chosen, list) and len(chosen) == 2
            and all(isinstance(m, dict) and m.get("role") == "assistant" for m in chosen))


def parse_row(row: dict, line: int, problems: RowProblems, *, responses: tuple[str, ...],
              default_id: int | str) -> PreferenceRow | None:
    """The row, or None after adding its problems (every field is checked, not only up to the first problem).
    ``responses``: those the loss trains on (an SFT row lacks rejected; the WRPO losses need chosen_pivot)."""
    before = len(problems.by_line)
    for name in row:
        close = difflib.get_close_matches(name, KNOWN_FIELDS, n=1, cutoff=0.85)
        if name not in KNOWN_FIELDS and close:  # other extra columns are metadata and are ignored
            problems.add(line, name, f"unknown field, did you mean {close[0]!r}?")
    sft = is_sft_row(row)
    for name in () if sft else ("chosen", "rejected"):
        if name not in row:
            problems.add(line, name, "missing")
    cached = _cached_scores(row, line, problems)
    prompt = chosen = rejected = chosen_pivot = None
    if sft:
        prompt, chosen = _sft_row(row, line, problems)
        if "rejected" in responses:
            form = "messages" if "messages" in row else "prompt and completion"
            problems.add(line, "rejected", f"missing: an SFT row ({form}) has no rejected response, and a "
                         "preference loss trains on pairs")
    else:
        if is_wrpo_authors_row(row):
            prompt = _prompt(row["prompt"], line, problems)
            answers = _messages(row["chosen"], "chosen", line, problems)
            chosen, chosen_pivot = (answers[0]["content"], answers[1]["content"]) if answers else (None, None)
            rejected = _answer(row["rejected"], "rejected", line, problems) if "rejected" in row else None
            if chosen_pivot is not None and chosen_pivot == rejected:
                problems.add(line, "chosen[1]", "identical to rejected (y_wt, read as chosen_pivot)")
        elif "prompt" in row:
            prompt = _prompt(row["prompt"], line, problems)
            chosen = _answer(row["chosen"], "chosen", line, problems) if "chosen" in row else None
            rejected = _answer(row["rejected"], "rejected", line, problems) if "rejected" in row else None
        elif "chosen" in row and "rejected" in row:
            prompt, chosen, rejected = _split_conversations(row, line, problems) or (None, None, None)
        if chosen is not None and chosen == rejected:
            problems.add(line, "rejected", "identical to chosen")
        if CHOSEN_PIVOT in row:
            chosen_pivot = _chosen_pivot(row, prompt, line, problems)
            if chosen_pivot is not None and chosen_pivot == rejected:
                problems.add(line, CHOSEN_PIVOT, "identical to rejected")
    if CHOSEN_PIVOT in responses and CHOSEN_PIVOT not in row and not is_wrpo_authors_row(row):
        problems.add(line, CHOSEN_PIVOT, "missing (loss.type=wrpo needs the pivot's own chosen response in every row)")
    if len(problems.by_line) > before:
        return None
    return PreferenceRow(id=row.get("id", default_id), line=line, prompt=prompt, chosen=chosen, rejected=rejected,
                         cached=cached, chosen_pivot=chosen_pivot, fields=row, where=problems.where[line])
