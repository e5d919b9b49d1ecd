"""What a run checks before it imports Megatron-Core or starts a process group, so that a mistake shows in seconds:
the config and the process layout, the run folder (``run_folder``), the checkpoint it starts from, the tokenizer,
and every row of both data files with the scores the loss needs from them, in one report.

Every rank runs the same checks on the same files, so every rank reaches the same verdict without talking to the
others: the entry point (launch/pretrain_infifpo.py) has rank 0 report a refusal while the other ranks exit
quietly. ``plan_run`` needs no torch (a config error shows before torch is imported); ``read_inputs`` tokenises the
data (torch, not Megatron); then ``pivot_card.check_stored_vocab`` reads the start checkpoint's metadata with
Megatron.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infifpo_mcore.config import ConfigError, InfiFPOConfig, load_config, validate_layout
from infifpo_mcore.pivot_card import apply_checkpoint_card
from infifpo_mcore.run_folder import RunStart, plan_start

if TYPE_CHECKING:
    from infifpo_mcore.data import PreferenceDataset
    from infifpo_mcore.tokenization import ChatTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    cfg: InfiFPOConfig  # resolved: with the model and tokenizer of the checkpoint it starts from
    start: RunStart
    data_parallel: int


@dataclass(frozen=True)
class RunInputs:
    """The pivot tokenizer and both splits, exactly as the training and the source ranks use them."""

    tokenizer: ChatTokenizer
    train: PreferenceDataset
    eval: PreferenceDataset | None


def plan_run(*, config: str, overrides: Sequence[str], fresh: bool, world_size: int) -> RunPlan:
    """The config (file, overrides, the start checkpoint's card), the layout on ``world_size`` ranks and how the
    run starts in its folder. No torch."""
    cfg = apply_checkpoint_card(load_config(path=config, overrides=overrides), overrides=overrides)
    data_parallel = validate_layout(cfg, world_size=world_size)
    return RunPlan(cfg=cfg, start=plan_start(cfg, fresh=fresh), data_parallel=data_parallel)


def read_inputs(cfg: InfiFPOConfig) -> RunInputs:
    """The tokenizer (its vocabulary checked against ``model.vocab_size``) and both splits (``load_splits``: one
    DataError listing every problem)."""
    from infifpo_mcore.references import load_splits
    from infifpo_mcore.tokenization import TokenizerError, build_tokenizer

    try:
        tokenizer = build_tokenizer(type=str(cfg.tokenizer.type), path=cfg.tokenizer.path,
                                    chat_template=cfg.tokenizer.chat_template)
    except TokenizerError as error:
        raise ConfigError(f"tokenizer: {error}") from None
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, {cfg.tokenizer.path}): its ids would index past the embedding")
    train, held_out = load_splits(cfg, tokenizer=tokenizer)
    return RunInputs(tokenizer=tokenizer, train=train, eval=held_out)


def describe_inputs(inputs: RunInputs, cfg: InfiFPOConfig) -> str:
    splits = [f"{len(inputs.train)} training pairs ({cfg.data.path})"]
    if inputs.eval is not None:
        splits.append(f"{len(inputs.eval)} held-out pairs ({cfg.data.eval_path})")
    return "data: " + ", ".join(splits)
