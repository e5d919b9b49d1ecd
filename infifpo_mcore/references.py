"""Per-row reference scores: every value a loss compares the policy with, under one key schema, by one route.

Key schema (the loss's own input names, ``losses.PreferenceLogps``), per split and dataset row:

    init_{response}_logps              [rows]     log-prob sum under the pivot init, in pivot tokens, for each
                                                  response of the loss spec (chosen, rejected, WRPO's chosen_pivot)
    source_{chosen,rejected}_logps     [rows, N]  sums under each of the N sources, in the source's own tokens
    source_{chosen,rejected}_lengths   [rows, N]  each source's token counts

Which columns a run needs is its loss spec's (``needed_keys``); a batch gets exactly those, joined by its row ids
on the last pipeline stage, the only one that computes the loss (``References.join``). Where they come from:

  - cached: the data's ``ref_*`` (pivot init, chosen and rejected) and ``fuse_*`` (sources) fields;
  - scored: when the loss needs pivot-init scores that the data does not cache, the pivot init scores every row
    of the split once, forward-only, before step 1 (then all its responses: a cache cannot hold WRPO's
    chosen_pivot, and one origin per split keeps the responses consistent). These are the checkpoint state
    (``state_dict``): a resumed run keeps the original reference, and one resumed past step 0 without them is
    refused (only the untrained pivot can give them);
  - stream: online (``sources.num_ranks`` > 0) the source ranks' scores of each global batch, received by the
    last stage, whose rows are checked against the rows this rank draws (``source_group.unpack_scores``).

Every needed column has an origin before anything trains: ``References`` refuses the run otherwise. The data
files and the source ranks read the same splits through ``load_splits``; a response cut to fit ``model.seq_length``
while its reference scores cover the whole text is a problem of its row (``data.load_preference_dataset``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from infifpo_mcore.config import ConfigError, InfiFPOConfig
from infifpo_mcore.data import (PreferenceBatch, PreferenceDataset, PreferenceRow, load_preference_dataset,
                                token_count)
from infifpo_mcore.losses import LOSSES, LossOptions, LossSpec, loss_options, loss_spec
from infifpo_mcore.source_group import ScoreReceiver, SourceGroupError, unpack_scores
from infifpo_mcore.tokenization import ChatTokenizer

# The order of a row's [4, N] scores on the online stream, too
SOURCE_KEYS = ("source_chosen_logps", "source_rejected_logps", "source_chosen_lengths", "source_rejected_lengths")
# The responses a data file may cache pivot-init scores (ref_*) for
CACHED_INIT_RESPONSES = ("chosen", "rejected")
# Checkpoint file keys: the train split's unprefixed, the held-out split's under this prefix (the layout of
# pivot_init_scores.safetensors since it exists: checkpoints of earlier runs load unchanged)
_STATE_PREFIX = {"train": "", "eval": "eval/"}


def init_key(response: str) -> str:
    return f"init_{response}_logps"


def needed_keys(spec: LossSpec, options: LossOptions) -> tuple[str, ...]:
    """The reference columns a loss reads under ``options``: nothing for a loss without a reference."""
    keys = [init_key(response) for response in spec.init_responses(options)]
    return (*keys, *(SOURCE_KEYS if spec.uses_sources else ()))


def _init_cacheable(spec: LossSpec) -> bool:
    return set(spec.responses) <= set(CACHED_INIT_RESPONSES)


def cached_columns(dataset: PreferenceDataset) -> dict[str, Tensor]:
    """The reference columns the data's cached fields give (float32, as any JSON number read into a batch)."""
    rows, columns = dataset.rows, {}
    if not rows:
        return columns
    if "ref_chosen_logps" in rows[0].cached:
        for kind in CACHED_INIT_RESPONSES:
            columns[init_key(kind)] = torch.tensor([row.cached[f"ref_{kind}_logps"] for row in rows],
                                                   dtype=torch.float32)
    if "fuse_chosen_logps" in rows[0].cached:
        for kind in ("chosen", "rejected"):
            sums = [row.cached[f"fuse_{kind}_logps"] for row in rows]
            means = [row.cached[f"fuse_mean_{kind}_logps"] for row in rows]
            columns[f"source_{kind}_logps"] = torch.tensor(sums, dtype=torch.float32)
            columns[f"source_{kind}_lengths"] = torch.tensor(
                [[token_count(total_logp=total, mean_logp=mean) for total, mean in zip(row_sums, row_means)]
                 for row_sums, row_means in zip(sums, means)], dtype=torch.float32)
    return columns


def load_splits(cfg: InfiFPOConfig, *, tokenizer: ChatTokenizer
                ) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """The train and held-out data exactly as the run uses them, loaded alike by the training ranks and the source
    ranks (same rows, same order, same checks), so that both draw the same rows."""
    spec, options = loss_spec(cfg.loss.type), loss_options(cfg.loss)
    online = cfg.sources.num_ranks > 0
    init_from_cache = spec.needs_init_scores(options) and _init_cacheable(spec)

    def whole_text_reference(row: PreferenceRow) -> str | None:
        """The row's reference scores computed on its whole text (the pivot init scores the cut text itself)."""
        if spec.uses_sources and online:
            return "the online source ranks'"
        used = [f"cached {name}_*" for name, present in (
            ("fuse", spec.uses_sources and "fuse_chosen_logps" in row.cached),
            ("ref", init_from_cache and "ref_chosen_logps" in row.cached)) if present]
        return ", ".join(used) or None

    def load(path: str, split: str | None) -> PreferenceDataset:
        return load_preference_dataset(
            path=path, tokenizer=tokenizer, seq_length=cfg.model.seq_length,
            max_prompt_length=cfg.data.max_prompt_length, num_sources=len(cfg.sources.models) or None,
            skip_invalid=cfg.data.skip_invalid_rows, responses=spec.responses, split=split,
            whole_text_reference=whole_text_reference)

    data = cfg.data
    train = load(data.path, data.split)
    if not data.eval_path:
        return train, None
    # data.eval_split null: data.split, where the held-out data is a folder of splits too
    return train, load(data.eval_path, data.eval_split or (data.split if Path(data.eval_path).is_dir() else None))


class References:
    """Every per-row reference column of a run's splits ("train", "eval"). Built on every training rank from the
    same data and checkpoint, so every decision it makes (what to score) is the same on all of them."""

    def __init__(self, *, cfg: InfiFPOConfig, datasets: dict[str, PreferenceDataset]):
        self.spec, self.options = loss_spec(cfg.loss.type), loss_options(cfg.loss)
        self.needed = needed_keys(self.spec, self.options)
        self.datasets = datasets
        self.paths = {"train": cfg.data.path, "eval": cfg.data.eval_path}
        self.online_sources = len(cfg.sources.models) if cfg.sources.num_ranks else 0
        self.tables: dict[str, dict[str, Tensor]] = {}
        self.scored: dict[str, set[str]] = {name: set() for name in datasets}  # the pivot init's, checkpointed
        self.receiver: ScoreReceiver | None = None
        self._eval_received = False
        problems = []
        for name, dataset in datasets.items():
            cached = cached_columns(dataset)
            path = self.paths[name]
            if self.online_sources and dataset.num_sources:
                problems.append(f"{path} carries source scores (fuse_*) and sources.num_ranks="
                                f"{cfg.sources.num_ranks} would score them again online; train from the cached "
                                "ones with sources.num_ranks=0")
            elif self.spec.uses_sources and not self.online_sources and not dataset.num_sources:
                others = ", ".join(name for name, spec in LOSSES.items() if not spec.uses_sources)
                problems.append(f"loss.type={cfg.loss.type} needs source scores (fuse_* fields) in {path}, which "
                                "has none; score the sources first (launch/score_sources.py) or use a loss whose "
                                f"reference is the pivot init ({others})")
            init = [key for key in self.needed if key.startswith("init_")]
            keep = list(SOURCE_KEYS) if self.spec.uses_sources and not self.online_sources else []
            if init and all(key in cached for key in init):
                keep += init
            self.tables[name] = {key: cached[key] for key in keep if key in cached}
        if problems:
            raise ConfigError(problems)

    @property
    def num_sources(self) -> int:
        return self.online_sources or self.datasets["train"].num_sources

    # ----------------------------------------------------------------------------------------------------------------
    # Pivot-init scores
    def drop_cached_init(self) -> list[str]:
        """Forget the data's cached pivot-init scores (ref_*), which describe the model the data was scored with:
        the pivot starts from other weights (an SFT run's), so it scores its init itself. Returns the splits that
        had them."""
        dropped = []
        for split, table in self.tables.items():
            if any(key.startswith("init_") for key in table):
                self.tables[split] = {key: value for key, value in table.items() if not key.startswith("init_")}
                dropped.append(split)
        return dropped

    def unscored_responses(self, split: str) -> list[str]:
        """The responses whose pivot-init scores the split needs and has no origin for (then the pivot init scores
        all of the spec's responses)."""
        held = self.tables[split].keys() | self.scored[split]  # scored: on the last stage, the same on every rank
        return [response for response in self.spec.responses
                if init_key(response) in self.needed and init_key(response) not in held]

    def add_scored(self, split: str, scores: dict[str, Tensor] | None) -> None:
        """``scores``: ``{"{response}_logps": [rows]}`` of the pivot init (the last stage's; None elsewhere)."""
        for response in self.spec.responses:
            key = init_key(response)
            if scores is not None:
                self.tables[split][key] = scores[f"{response}_logps"]
            self.scored[split].add(key)

    def state_dict(self) -> dict[str, Tensor]:
        """The scored pivot-init columns this rank holds (``{prefix}{response}_logps``: the checkpoint layout)."""
        return {_STATE_PREFIX[split] + key.removeprefix("init_"): self.tables[split][key]
                for split, keys in self.scored.items() for key in sorted(keys) if key in self.tables[split]}

    def load_state_dict(self, state: dict[str, Tensor], *, where: str) -> None:
        """Scores a checkpoint (``where``) saved; they take precedence over cached ones (the reference the run
        started with) and are saved again with every checkpoint, also those this loss does not read (a later run
        with other options may)."""
        for split, dataset in self.datasets.items():
            prefix = _STATE_PREFIX[split]
            for saved, values in state.items():
                response = saved.removeprefix(prefix).removesuffix("_logps")
                if not saved.startswith(prefix) or "/" in response:
                    continue
                key = init_key(response)
                if len(values) != len(dataset):
                    if key in self.needed:
                        raise ConfigError(f"{where} holds pivot-init scores of {len(values)} {split} rows, the "
                                          f"data ({self.paths[split]}) has {len(dataset)}: it was trained on other "
                                          "data")
                    continue
                self.tables[split][key] = values
                self.scored[split].add(key)

    # ----------------------------------------------------------------------------------------------------------------
    # The online stream
    def stream_from(self, receiver: ScoreReceiver) -> None:
        self.receiver = receiver

    def take_stream_batch(self, *, step: int, rows: list[int], data_rank: int, data_size: int) -> None:
        """Online: the scores of step ``step``'s global batch, of which this rank draws ``rows`` (data-parallel
        rank ``data_rank`` of ``data_size`` takes every ``data_size``-th row of the global batch). Collective over
        the training ranks (rank 0 grants the next batch); the receivers check and store the scores."""
        message = self.receiver.next_batch(step=step)
        if message is None:
            return
        what = f"the source scores of step {step}"
        indices, scores = unpack_scores(message, dataset=self.datasets["train"], path=self.paths["train"],
                                        num_sources=self.online_sources, what=what)
        if (share := indices[data_rank::data_size]) != rows:
            raise SourceGroupError(f"{what} are for dataset rows {share} where data-parallel rank {data_rank} trains on "
                                   f"rows {rows}: the source ranks replayed another data order (data.shuffle, "
                                   "train.seed, train.global_batch_size must be theirs)")
        self._store_stream("train", indices, scores)

    def _store_stream(self, split: str, indices: list[int], scores: Tensor) -> None:
        table = self.tables[split]
        if SOURCE_KEYS[0] not in table:
            rows = len(self.datasets[split])
            table.update({key: torch.zeros((rows, self.online_sources)) for key in SOURCE_KEYS})
        for key, values in zip(SOURCE_KEYS, scores.float().unbind(1), strict=True):
            table[key][indices] = values  # float32, like the cached scores: both modes give the same batch

    # ----------------------------------------------------------------------------------------------------------------
    def join(self, batch: PreferenceBatch, split: str, *, device: torch.device) -> None:
        """Last stage: ``batch["reference"]``, the needed columns at the batch's rows."""
        if split == "eval" and self.receiver is not None and not self._eval_received:
            indices, scores = unpack_scores(self.receiver.eval_scores(), dataset=self.datasets["eval"],
                                            path=self.paths["eval"], num_sources=self.online_sources,
                                            what="the source scores of the held-out rows")
            if indices != list(range(len(self.datasets["eval"]))):
                raise SourceGroupError("the source ranks scored other held-out rows than this run evaluates")
            self._store_stream("eval", indices, scores)
            self._eval_received = True
        table, rows = self.tables[split], batch["row_ids"]
        missing = [key for key in self.needed if key not in table]
        if missing:
            raise RuntimeError(f"no {', '.join(missing)} for the {split} rows: a reference column has no origin")
        batch["reference"] = {key: table[key][rows].to(device) for key in self.needed}
