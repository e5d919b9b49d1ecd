"""Preference data: read and validate JSONL rows, tokenise with the pivot tokenizer, collate chosen/rejected pairs,
and a resumable data-parallel sampler.

Row forms (one JSON object per line; blank lines are allowed and are not rows):
  - TRL: ``prompt`` (a string, taken as one user message, or a list of chat messages), ``chosen`` and ``rejected``
    (strings, or a list holding one assistant message).
  - InfiFPO reference: no ``prompt``; ``chosen``/``rejected`` are full conversations that share their first
    messages (the prompt) and each end with one assistant message.
Optional: ``id`` (string or int; default: the line number) and cached scores: ``ref_chosen_logps``,
``ref_rejected_logps`` (pivot init, sums) with optional ``ref_mean_chosen_logps``/``ref_mean_rejected_logps``;
per-source lists ``fuse_chosen_logps``, ``fuse_rejected_logps``, ``fuse_mean_chosen_logps``,
``fuse_mean_rejected_logps`` (each source's token count = sum / mean). Cached fields must be in every row or none,
with one entry per configured source when the sources are given.
Every problem is reported at once as ``file:line field: problem`` in a ``DataError``; no row is skipped silently:
with ``skip_invalid`` the rows with problems are left out, and the dataset counts and lists them.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NotRequired, Required, TypedDict

import torch

from infifpo_mcore.tokenization import ChatTokenizer, Message, TokenizerError

logger = logging.getLogger(__name__)

REF_SUMS = ("ref_chosen_logps", "ref_rejected_logps")
REF_MEANS = ("ref_mean_chosen_logps", "ref_mean_rejected_logps")
FUSE_FIELDS = ("fuse_chosen_logps", "fuse_rejected_logps", "fuse_mean_chosen_logps", "fuse_mean_rejected_logps")
KNOWN_FIELDS = ("id", "prompt", "chosen", "rejected", *REF_SUMS, *REF_MEANS, *FUSE_FIELDS)
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Invalid preference data; ``problems`` lists every ``file:line field: problem``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the preference data:\n  " + "\n  ".join(problems))


@dataclass
class PreferenceRow:
    id: str | int
    line: int
    prompt: list[Message]
    chosen: str
    rejected: str
    cached: dict[str, float | list[float]]
    fields: dict = field(default_factory=dict)  # the row as read, every field: what a rewriter (the scorer) keeps


class PreferenceExample(TypedDict):
    row_id: int
    id: str | int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    init_chosen_logps: NotRequired[float]
    init_rejected_logps: NotRequired[float]
    source_chosen_logps: NotRequired[list[float]]
    source_rejected_logps: NotRequired[list[float]]
    source_chosen_lengths: NotRequired[list[float]]
    source_rejected_lengths: NotRequired[list[float]]


class PreferenceBatch(TypedDict, total=False):
    tokens: Required[torch.Tensor]        # [2B, S] int64, rows 0..B-1 chosen, B..2B-1 rejected
    labels: Required[torch.Tensor]        # [2B, S] int64, labels[:, t] = tokens[:, t + 1]; pad_id past the end
    loss_mask: Required[torch.Tensor]     # [2B, S] float32, 1 where labels[:, t] is a response token
    position_ids: Required[torch.Tensor]  # [2B, S] int64
    row_ids: Required[torch.Tensor]       # [B] int64, dataset indices
    init_chosen_logps: torch.Tensor       # [B] sums under the pivot init (cached)
    init_rejected_logps: torch.Tensor     # [B]
    source_chosen_logps: torch.Tensor     # [B, N] sums under each source (cached)
    source_rejected_logps: torch.Tensor   # [B, N]
    source_chosen_lengths: torch.Tensor   # [B, N] each source's own token counts
    source_rejected_lengths: torch.Tensor  # [B, N]


class _Problems:
    """Collects ``file:line field: problem`` strings for one file; ``sorted()`` orders them by line."""

    def __init__(self, path: str):
        self.path = path
        self.by_line: list[tuple[int, str]] = []

    def add(self, line: int, field_name: str, problem: str) -> None:
        self.by_line.append((line, f"{self.path}:{line} {field_name}: {problem}"))

    def sorted(self) -> list[str]:
        return [text for _, text in sorted(self.by_line, key=lambda item: item[0])]

    @property
    def lines(self) -> set[int]:
        return {line for line, _ in self.by_line}


def _not_unicode(text: str) -> bool:
    """A JSON escape can produce a lone UTF-16 surrogate, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _messages(value: object, name: str, line: int, problems: _Problems) -> list[Message] | None:
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


def _answer(value: object, name: str, line: int, problems: _Problems) -> str | None:
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


def _split_conversations(row: dict, line: int, problems: _Problems) -> tuple[list[Message], str, str] | None:
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


def _check_logp(value: object, name: str, line: int, problems: _Problems) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(line, name, f"expected a number, got {type(value).__name__}")
    elif not math.isfinite(value):
        problems.add(line, name, f"not finite ({value})")
    elif value > 0:
        problems.add(line, name, f"log-probability must be <= 0, got {value}")
    else:
        return float(value)
    return None


def _scores(value: object, name: str, line: int, problems: _Problems, *, per_source: bool):
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


def _cached_scores(row: dict, line: int, problems: _Problems) -> dict[str, float | list[float]]:
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


def _parse_row(row: dict, line: int, problems: _Problems) -> PreferenceRow | None:
    """The row, or None after adding its problems (every field is checked, not only up to the first problem)."""
    before = len(problems.by_line)
    for name in row:
        close = difflib.get_close_matches(name, KNOWN_FIELDS, n=1, cutoff=0.85)
        if name not in KNOWN_FIELDS and close:  # other extra columns are metadata and are ignored
            problems.add(line, name, f"unknown field, did you mean {close[0]!r}?")
    for name in ("chosen", "rejected"):
        if name not in row:
            problems.add(line, name, "missing")
    cached = _cached_scores(row, line, problems)
    prompt = chosen = rejected = None
    if "prompt" in row:
        prompt = row["prompt"]
        is_text = isinstance(prompt, str) and prompt.strip()
        prompt = _messages([{"role": "user", "content": prompt}] if is_text else prompt, "prompt", line, problems)
        if prompt is not None and prompt[-1]["role"] == "assistant":
            problems.add(line, "prompt", "the last prompt message must not be an assistant message")
        chosen = _answer(row["chosen"], "chosen", line, problems) if "chosen" in row else None
        rejected = _answer(row["rejected"], "rejected", line, problems) if "rejected" in row else None
    elif "chosen" in row and "rejected" in row:
        prompt, chosen, rejected = _split_conversations(row, line, problems) or (None, None, None)
    if chosen is not None and chosen == rejected:
        problems.add(line, "rejected", "identical to chosen")
    if len(problems.by_line) > before:
        return None
    return PreferenceRow(id=row.get("id", line), line=line, prompt=prompt, chosen=chosen, rejected=rejected,
                         cached=cached, fields=row)


def read_preference_rows(path: str | Path, *, num_sources: int | None = None) -> list[PreferenceRow]:
    """Read and validate every row of a JSONL file; raises DataError listing all problems.

    ``num_sources``: the number of configured source models, which every ``fuse_*`` list must match."""
    rows, problems = _read_rows(path, num_sources=num_sources)
    if problems.by_line:
        raise DataError(problems.sorted())
    return rows


def _read_rows(path: str | Path, *, num_sources: int | None) -> tuple[list[PreferenceRow], _Problems]:
    """The valid rows and the problems of the others (raises DataError only when the file itself is unusable)."""
    problems = _Problems(str(path))
    if not Path(path).is_file():
        raise DataError([f"{path}: file not found"])
    rows: list[PreferenceRow] = []
    first_line_of: dict[str | int, int] = {}
    for line, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            problems.add(line, "line", f"not valid UTF-8 (byte {error.start})")
            continue
        except json.JSONDecodeError as error:
            problems.add(line, "line", f"not valid JSON ({error.msg} at column {error.colno})")
            continue
        except (ValueError, RecursionError) as error:  # e.g. an integer of 5000 digits, nesting 10000 deep
            problems.add(line, "line", f"not usable JSON ({type(error).__name__}: {str(error)[:80]})")
            continue
        if not isinstance(row, dict):
            problems.add(line, "line", f"expected a JSON object, got {type(row).__name__}")
            continue
        row_id = row.get("id", line)
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or row_id == "":
            problems.add(line, "id", "expected a non-empty string or an int")
        elif row_id in first_line_of:
            problems.add(line, "id", f"duplicate of line {first_line_of[row_id]} ({row_id!r})")
        else:
            first_line_of[row_id] = line
        parsed = _parse_row(row, line, problems)
        if parsed is not None:
            rows.append(parsed)
    _check_across_rows(rows, problems, num_sources=num_sources)
    if not rows and not problems.by_line:
        raise DataError([f"{path}: no rows"])
    return [row for row in rows if row.line not in problems.lines], problems


def _check_across_rows(rows: list[PreferenceRow], problems: _Problems, *, num_sources: int | None) -> None:
    """Cached fields and the number of sources are the same in every row (as in the first valid row) and, when
    the sources are configured, the number of sources is theirs."""
    if not rows:
        return
    first = rows[0]
    if num_sources is not None:
        for row in rows:
            got = len(row.cached.get("fuse_chosen_logps", [None] * num_sources))
            if got != num_sources:
                problems.add(row.line, "fuse_chosen_logps", f"{got} sources, but sources.models lists {num_sources}")
    for row in rows[1:]:
        for name in sorted(set(first.cached) ^ set(row.cached)):
            state = "missing" if name in first.cached else "present"
            problems.add(row.line, name, f"{state} here but not in line {first.line} (cached scores must be in "
                         "every row or in none)")
        if "fuse_chosen_logps" in first.cached and "fuse_chosen_logps" in row.cached:
            expected, got = len(first.cached["fuse_chosen_logps"]), len(row.cached["fuse_chosen_logps"])
            if expected != got:
                problems.add(row.line, "fuse_chosen_logps", f"{got} sources, but line {first.line} has {expected}")


def truncate_example(*, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], seq_length: int,
                     max_prompt_length: int | None, bos_id: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """With ``max_prompt_length``, left-truncate the prompt to it (and to leave room for one response token; a
    leading BOS is kept); then right-truncate each response to fit ``seq_length``. Returns the three lists and
    whether anything was cut. Without ``max_prompt_length`` a prompt is never cut: the caller refuses one that
    leaves no room for the response."""
    prompt = prompt_ids
    prompt_limit = len(prompt) if max_prompt_length is None else min(max_prompt_length, seq_length - 1)
    if len(prompt) > prompt_limit:
        keep_bos = bos_id is not None and prompt[0] == bos_id and prompt_limit > 1
        prompt = [bos_id] + prompt[len(prompt) - prompt_limit + 1:] if keep_bos else prompt[-prompt_limit:]
    room = seq_length - len(prompt)
    if room < 1:
        raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room for a response in seq_length={seq_length}")
    chosen, rejected = chosen_ids[:room], rejected_ids[:room]
    truncated = len(prompt) < len(prompt_ids) or len(chosen) < len(chosen_ids) or len(rejected) < len(rejected_ids)
    return prompt, chosen, rejected, truncated


class PreferenceDataset:
    """Validated rows tokenised with the pivot tokenizer. ``num_truncated`` counts rows cut to fit."""

    def __init__(self, *, rows: list[PreferenceRow], examples: list[PreferenceExample], num_truncated: int,
                 skipped: list[str] | None = None, num_skipped_rows: int = 0):
        self.rows = rows  # rows[i] is the row of examples[i]
        self.examples = examples
        self.num_truncated = num_truncated
        self.skipped = skipped or []  # the problems of the rows left out (skip_invalid)
        self.num_skipped_rows = num_skipped_rows
        fuse = rows[0].cached.get("fuse_chosen_logps", []) if rows else []
        self.num_sources = len(fuse)
        self.has_init_logps = bool(rows) and "ref_chosen_logps" in rows[0].cached

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PreferenceExample:
        return self.examples[index]


def _example(row_index: int, row: PreferenceRow, ids: tuple[list[int], list[int], list[int]]) -> PreferenceExample:
    example = PreferenceExample(row_id=row_index, id=row.id, prompt_ids=ids[0], chosen_ids=ids[1],
                                rejected_ids=ids[2])
    cached = row.cached
    if "ref_chosen_logps" in cached:
        example["init_chosen_logps"] = cached["ref_chosen_logps"]
        example["init_rejected_logps"] = cached["ref_rejected_logps"]
    if "fuse_chosen_logps" in cached:
        for kind in ("chosen", "rejected"):
            sums, means = cached[f"fuse_{kind}_logps"], cached[f"fuse_mean_{kind}_logps"]
            example[f"source_{kind}_logps"] = sums
            example[f"source_{kind}_lengths"] = [token_count(total_logp=total, mean_logp=mean)
                                                 for total, mean in zip(sums, means, strict=True)]
    return example


def load_preference_dataset(*, path: str | Path, tokenizer: ChatTokenizer, seq_length: int,
                            max_prompt_length: int | None, num_sources: int | None = None,
                            skip_invalid: bool = False) -> PreferenceDataset:
    """Read, validate and tokenise a preference JSONL file (see the module docstring for the row forms).

    Raises DataError listing every problem; with ``skip_invalid`` the rows with problems are left out instead
    (``dataset.skipped`` lists their problems) unless no row is left."""
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2, got {seq_length}")
    rows, problems = _read_rows(path, num_sources=num_sources)
    kept: list[PreferenceRow] = []
    examples: list[PreferenceExample] = []
    num_truncated = 0
    for row in rows:
        try:
            prompt_ids = tokenizer.encode_prompt(row.prompt)
        except TokenizerError as error:
            problems.add(row.line, "prompt", str(error))
            continue
        if max_prompt_length is None and len(prompt_ids) >= seq_length:
            problems.add(row.line, "prompt", f"{len(prompt_ids)} tokens leave no room for the response in "
                         f"model.seq_length={seq_length} (data.max_prompt_length cuts prompts from the left)")
            continue
        chosen_ids, rejected_ids = tokenizer.encode_response(row.chosen), tokenizer.encode_response(row.rejected)
        *ids, truncated = truncate_example(
            prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids, seq_length=seq_length,
            max_prompt_length=max_prompt_length, bos_id=tokenizer.bos_id)
        if ids[1] == ids[2]:
            problems.add(row.line, "rejected", f"identical to chosen in the first {len(ids[1])} response tokens, "
                         f"all that fit model.seq_length={seq_length} after the {len(ids[0])}-token prompt")
            continue
        num_truncated += truncated
        examples.append(_example(len(kept), row, tuple(ids)))
        kept.append(row)
    if problems.by_line and not (skip_invalid and kept):
        raise DataError(problems.sorted() + ([f"{path}: no valid row left to train on"] if skip_invalid else []))
    if num_truncated:
        logger.warning("%s: %d of %d rows truncated to seq_length=%d (max_prompt_length=%s); cached scores of "
                       "those rows still describe the full responses", path, num_truncated, len(kept), seq_length,
                       max_prompt_length)
    return PreferenceDataset(rows=kept, examples=examples, num_truncated=num_truncated, skipped=problems.sorted(),
                             num_skipped_rows=len(problems.lines))


def collate_pairs(examples: list[PreferenceExample], *, seq_length: int, pad_id: int) -> PreferenceBatch:
    """Stack B examples into one micro-batch of 2B sequences (chosen rows first, then rejected), each
    ``prompt + response`` padded with ``pad_id`` to ``seq_length``; see ``PreferenceBatch`` for shapes."""
    count = len(examples)
    tokens = torch.full((2 * count, seq_length), pad_id, dtype=torch.int64)
    labels = torch.full((2 * count, seq_length), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((2 * count, seq_length), dtype=torch.float32)
    sequences = [(e["prompt_ids"], e["chosen_ids"]) for e in examples]
    sequences += [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
    for row, (prompt, response) in enumerate(sequences):
        ids = prompt + response
        if len(ids) > seq_length or not prompt or not response:
            raise ValueError(f"sequence {row}: prompt {len(prompt)} + response {len(response)} tokens must be "
                             f"non-empty and fit seq_length={seq_length}")
        tokens[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids) - 1] = torch.tensor(ids[1:])
        # Position t predicts token t + 1, so response tokens are the labels of positions P-1 .. P+R-2.
        loss_mask[row, len(prompt) - 1:len(ids) - 1] = 1.0
    batch = PreferenceBatch(tokens=tokens, labels=labels, loss_mask=loss_mask,
                            position_ids=torch.arange(seq_length).expand(2 * count, seq_length).clone(),
                            row_ids=torch.tensor([e["row_id"] for e in examples], dtype=torch.int64))
    for key in ("init_chosen_logps", "init_rejected_logps", "source_chosen_logps", "source_rejected_logps",
                "source_chosen_lengths", "source_rejected_lengths"):
        present = [key in e for e in examples]
        if any(present) and not all(present):
            raise ValueError(f"{key} is cached for some examples of the batch but not all")
        if all(present):
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch


class ResumableSampler:
    """Dataset indices for one data-parallel rank, without end, independent of the data-parallel size.

    The global stream is the concatenation of per-epoch permutations (drawn from ``seed + epoch``; identity when
    ``shuffle`` is off). Rank r of ``dp_size`` takes stream positions r, r + dp_size, ...; so a global batch is the
    next ``global_batch_size`` stream entries whatever the layout, and the state is one number: ``consumed``, the
    stream entries handed out by all ranks together. A sampler given that state (at the same or another dp_size)
    yields exactly what the original ranks would have yielded next.
    """

    def __init__(self, *, num_rows: int, seed: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if num_rows < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed = 0

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, order = -1, []
        while True:
            position_epoch, offset = divmod(self.consumed + self.dp_rank, self.num_rows)
            if position_epoch != epoch:
                epoch, order = position_epoch, self.epoch_order(position_epoch)
            self.consumed += self.dp_size
            yield order[offset]

    def state_dict(self) -> dict[str, int | bool]:
        return {"consumed": self.consumed, "seed": self.seed, "num_rows": self.num_rows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        for key in ("seed", "num_rows", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler has {getattr(self, key)}; "
                                 "resuming would change the data order")
        if state["consumed"] % self.dp_size:
            raise ValueError(f"sampler state consumed={state['consumed']} rows, not a multiple of data-parallel "
                             f"size {self.dp_size}")
        self.consumed = int(state["consumed"])
