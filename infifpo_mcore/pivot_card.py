"""What a checkpoint's weights are: the pivot's model and tokenizer config, carried inside every checkpoint.

Layout, inside an iteration directory::

    iter_XXXXXXX/pivot.yaml       {model: {...}, tokenizer: {...}} — the two sections of a run config
    iter_XXXXXXX/tokenizer/       the tokenizer's files when it is a local file (a pkg:// path is kept as is)
    iter_XXXXXXX/hf_config.json   the HF config.json the pivot was converted from (absent for pivots made here)

``checkpoints_tools/hf_to_mcore.py`` writes it for a converted HF model, the trainer with every checkpoint it saves,
so ``checkpoints_tools/mcore_to_hf.py`` exports a trained pivot with its tokenizer.

**Precedence** when ``checkpoint.load`` names a checkpoint with a card (``resolve_pivot``): the card's ``model.*``
and ``tokenizer.*`` replace the config file's — the weights define the shape. A command-line override of one of
those keys that contradicts the card is refused by name (one equal to it is accepted). Two keys stay the run's
choice: ``model.seq_length`` (bounded by the card's ``model.max_position_embeddings``) and
``tokenizer.chat_template`` when given on the command line (e.g. for a base model without a template of its own).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from operator import attrgetter
from pathlib import Path
from typing import Any

import yaml

from infifpo_mcore.checkpoint_layout import CheckpointError, resolve_checkpoint
from infifpo_mcore.config import ConfigError, InfiFPOConfig, ModelConfig, TokenizerConfig, load_config, to_dict

CARD_FILE = "pivot.yaml"
TOKENIZER_DIR = "tokenizer"
HF_CONFIG_FILE = "hf_config.json"
# Files that make up a tokenizer beside its main file: HF special tokens, chat template, BPE vocab/merges.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
# Keys a run may set differently from the checkpoint it starts from.
RUN_CHOICES = ("model.seq_length", "tokenizer.chat_template")


@dataclass
class PivotCard:
    model: ModelConfig
    tokenizer: TokenizerConfig | None  # None: the weights came without a tokenizer; runs take their config's
    hf_config: dict[str, Any] | None = None
    # name -> content, read when the card is built: the source files may be gone by the time a checkpoint is saved
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)


def build_card(*, model: ModelConfig, tokenizer: TokenizerConfig | None,
               hf_config: dict[str, Any] | None) -> PivotCard:
    """A card for `model` and `tokenizer`, with the tokenizer's files (the main one and its siblings) read now."""
    files: dict[str, bytes] = {}
    if tokenizer is not None and not tokenizer.path.startswith("pkg://"):
        main = Path(tokenizer.path).expanduser()
        files[main.name] = main.read_bytes()
        files.update({name: (main.parent / name).read_bytes() for name in TOKENIZER_FILES
                      if name != main.name and (main.parent / name).is_file()})
        tokenizer = dataclasses.replace(tokenizer, path=f"{TOKENIZER_DIR}/{main.name}")
    return PivotCard(model=model, tokenizer=tokenizer, hf_config=hf_config, tokenizer_files=files)


def write_card(card: PivotCard, *, directory: Path) -> None:
    """Writes the card into a checkpoint's iteration directory (the tokenizer path relative to it)."""
    sections = to_dict(InfiFPOConfig(model=card.model, tokenizer=card.tokenizer or TokenizerConfig()))
    keys = ("model", "tokenizer") if card.tokenizer is not None else ("model",)
    (directory / CARD_FILE).write_text(yaml.safe_dump({key: sections[key] for key in keys}, sort_keys=False),
                                       encoding="utf-8")
    if card.tokenizer_files:
        (directory / TOKENIZER_DIR).mkdir(exist_ok=True)
        for name, content in card.tokenizer_files.items():
            (directory / TOKENIZER_DIR / name).write_bytes(content)
    if card.hf_config is not None:
        (directory / HF_CONFIG_FILE).write_text(json.dumps(card.hf_config, indent=2, sort_keys=True), encoding="utf-8")


def read_card(directory: Path) -> PivotCard | None:
    """The card of an iteration directory, or None when it has none (a checkpoint from before cards existed).
    The tokenizer path comes back absolute."""
    card_file = directory / CARD_FILE
    if not card_file.is_file():
        return None
    cfg = load_config(path=card_file)  # a ConfigError names the file and the key
    tokenizer = cfg.tokenizer if "tokenizer" in yaml.safe_load(card_file.read_text(encoding="utf-8")) else None
    files = {}
    if tokenizer is not None and not tokenizer.path.startswith("pkg://"):
        tokenizer = dataclasses.replace(tokenizer, path=str(directory / tokenizer.path))
        files = {path.name: path.read_bytes() for path in sorted((directory / TOKENIZER_DIR).glob("*"))}
    hf_file = directory / HF_CONFIG_FILE
    hf_config = json.loads(hf_file.read_text(encoding="utf-8")) if hf_file.is_file() else None
    return PivotCard(model=cfg.model, tokenizer=tokenizer, hf_config=hf_config, tokenizer_files=files)


def copy_tokenizer_files(directory: Path, *, out_dir: Path) -> list[str]:
    """The tokenizer files a checkpoint carries, copied into `out_dir`; their names."""
    source = directory / TOKENIZER_DIR
    names = sorted(path.name for path in source.glob("*")) if source.is_dir() else []
    for name in names:
        shutil.copy(source / name, out_dir / name)
    return names


def _overridden_keys(overrides: Sequence[str]) -> list[str]:
    """Dotted model.* / tokenizer.* keys that command-line overrides set (a whole-section override sets them all)."""
    keys = []
    for override in overrides:
        key = override.partition("=")[0].strip()
        section = key.split(".")[0]
        section_type = {"model": ModelConfig, "tokenizer": TokenizerConfig}.get(section)
        if section_type is not None:
            keys += [key] if "." in key else [f"{section}.{item.name}" for item in dataclasses.fields(section_type)]
    return keys


def _shown(value: Any) -> str:
    return repr(value.value if isinstance(value, Enum) else value)


def apply_card(cfg: InfiFPOConfig, *, card: PivotCard, source: str, overrides: Sequence[str]) -> InfiFPOConfig:
    """`cfg` with the card's model and tokenizer, by the precedence rule of this module's docstring."""
    overridden = _overridden_keys(overrides)
    problems = []
    for key in overridden:
        if key in RUN_CHOICES or (card.tokenizer is None and key.startswith("tokenizer.")):
            continue
        given, saved = attrgetter(key)(cfg), attrgetter(key)(card)
        if given != saved:
            problems.append(f"{key}={_shown(given)} (from the command line) contradicts checkpoint.load={source}, "
                            f"whose weights have {key}={_shown(saved)}; drop the override")
    if problems:
        raise ConfigError(problems)
    tokenizer = cfg.tokenizer
    if card.tokenizer is not None and "tokenizer.chat_template" not in overridden:
        tokenizer = card.tokenizer
    elif card.tokenizer is not None:
        tokenizer = dataclasses.replace(card.tokenizer, chat_template=cfg.tokenizer.chat_template)
    return dataclasses.replace(cfg, model=dataclasses.replace(card.model, seq_length=cfg.model.seq_length),
                               tokenizer=tokenizer)


def resolve_pivot(cfg: InfiFPOConfig, *, overrides: Sequence[str]) -> InfiFPOConfig:
    """`cfg` as the run will use it: with the model and tokenizer of the checkpoint it loads, if that has a card."""
    cfg = apply_checkpoint_card(cfg, overrides=overrides)
    check_stored_vocab(cfg)
    return cfg


def _start_checkpoint(cfg: InfiFPOConfig) -> Path:
    try:
        return resolve_checkpoint(Path(cfg.checkpoint.load))
    except CheckpointError as error:
        raise ConfigError(f"checkpoint.load: {error}") from None


def apply_checkpoint_card(cfg: InfiFPOConfig, *, overrides: Sequence[str]) -> InfiFPOConfig:
    """The first half of ``resolve_pivot``, without Megatron: the card of the checkpoint ``cfg`` loads applied."""
    if not cfg.checkpoint.load:
        return cfg
    card = read_card(_start_checkpoint(cfg))
    return cfg if card is None else apply_card(cfg, card=card, source=cfg.checkpoint.load, overrides=overrides)


def check_stored_vocab(cfg: InfiFPOConfig) -> None:
    """The second half of ``resolve_pivot`` (reads the checkpoint's metadata with Megatron): the checkpoint's
    padded vocabulary is the one this run pads to."""
    if not cfg.checkpoint.load:
        return
    directory = _start_checkpoint(cfg)
    if read_card(directory) is None:
        return
    from infifpo_mcore.memory import padded_vocab

    rows, tensor = stored_vocab_rows(directory), cfg.parallel.tensor
    wanted = padded_vocab(model=cfg.model, vocab_size=cfg.model.vocab_size, tensor=tensor)
    if rows != wanted:
        raise ConfigError(
            f"parallel.tensor={tensor}: the pivot pads model.vocab_size {cfg.model.vocab_size} to {wanted} rows "
            f"(a multiple of model.make_vocab_size_divisible_by {cfg.model.make_vocab_size_divisible_by} x {tensor}) "
            f"but checkpoint.load={cfg.checkpoint.load} stores {rows}; load it at a tensor size that pads alike")


def stored_vocab_rows(directory: Path) -> int:
    """Rows of the (padded) embedding a checkpoint stores, from its metadata."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    return metadata["embedding.word_embeddings.weight"].global_shape[0]


def card_for_run(cfg: InfiFPOConfig, *, vocab_size: int) -> PivotCard:
    """The card a run writes with its checkpoints: its model (with the vocabulary it actually built), tokenizer,
    and the HF config of the checkpoint it started from, if any (so an export writes the original config.json)."""
    start = read_card(resolve_checkpoint(Path(cfg.checkpoint.load))) if cfg.checkpoint.load else None
    return build_card(model=dataclasses.replace(cfg.model, vocab_size=vocab_size), tokenizer=cfg.tokenizer,
                      hf_config=start.hf_config if start else None)
