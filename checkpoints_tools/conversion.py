"""HF model directory <-> Megatron-Core dist checkpoint of the pivot.

Conversion runs in one process at TP 1 / PP 1: the whole model is built once, filled with the mapped tensors and
saved with ``dist_checkpointing``, which stores every tensor whole with its sharding recipe, so the trainer (or
``verify.py``) loads the checkpoint at any TP / PP. The requested TP / PP are checked at conversion time against
heads, query groups, FFN width and layers (a layout that cannot work is refused before any training) and the
vocabulary is padded for that TP.
Export loads a checkpoint saved at any layout the same way, at TP 1 / PP 1. Callers initialise the process group
(``init_parallel``); the scripts beside this module do.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

from infifpo_mcore import checkpointing, pivot_card
from infifpo_mcore.config import (ConfigError, InfiFPOConfig, ModelConfig, ParallelConfig, TokenizerConfig,
                                  TokenizerType, validate_layout)
from infifpo_mcore.memory import padded_vocab
from infifpo_mcore.model import build_gpt, build_transformer_config
from infifpo_mcore.parallel import ParallelContext, init_parallel
from checkpoints_tools.families import Family
from checkpoints_tools.hf_config import (ConversionError, check_unchanged, derive_pivot, llama_config_for,
                                        read_hf_config)
from checkpoints_tools.weights import hf_to_megatron, megatron_to_hf, read_hf_tensors, write_hf_tensors

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def start_process_group(*, tensor: int = 1, pipeline: int = 1) -> ParallelContext:
    """torch.distributed + Megatron state for a tool: torchrun's layout, or one process on a free local port."""
    if "RANK" not in os.environ:  # plain python: a private port, so two tools (or a training job) never collide
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tensor * pipeline:
        raise ConversionError(f"{world} processes for --tp {tensor} x --pp {pipeline}: start "
                              f"--nproc_per_node {tensor * pipeline}")
    return init_parallel(tensor=tensor, pipeline=pipeline, seed=0)


def check_layout(*, model: ModelConfig, tensor: int, pipeline: int) -> None:
    """Refuses a TP / PP layout the pivot cannot be split into (the trainer's own launch checks)."""
    cfg = InfiFPOConfig(model=model, parallel=ParallelConfig(tensor=tensor, pipeline=pipeline))
    try:
        validate_layout(cfg, world_size=tensor * pipeline)
    except ConfigError as error:
        raise ConversionError(f"--tp {tensor} --pp {pipeline} cannot hold this model: "
                              + "; ".join(error.problems)) from None


def hf_tokenizer(hf_dir: Path) -> TokenizerConfig | None:
    """The model directory's own tokenizer (tokenizer.json + its chat template), or None when it has none."""
    path = hf_dir / "tokenizer.json"
    return TokenizerConfig(type=TokenizerType.hf, path=str(path), chat_template=None) if path.is_file() else None


@dataclass(frozen=True)
class ConversionPlan:
    """What a HF directory converts into, decided (or refused) before any process group or weight is touched."""

    hf_dir: Path
    hf_config: dict
    family: Family
    model: ModelConfig
    vocab_rows: int  # the padded vocabulary the checkpoint stores


def plan_conversion(*, hf_dir: Path, tensor: int, pipeline: int) -> ConversionPlan:
    hf_config = read_hf_config(hf_dir)
    family, model = derive_pivot(hf_config=hf_config, source=str(hf_dir / "config.json"))
    check_layout(model=model, tensor=tensor, pipeline=pipeline)
    rows = padded_vocab(model=model, vocab_size=model.vocab_size, tensor=tensor)
    return ConversionPlan(hf_dir=hf_dir, hf_config=hf_config, family=family, model=model, vocab_rows=rows)


def convert_hf_to_mcore(*, plan: ConversionPlan, out: Path, ctx: ParallelContext) -> Path:
    """Writes ``out/iter_0000000`` (+ ``latest``): the model, its pivot card and the tokenizer files."""
    if ctx.world_size != 1:
        raise ConversionError("conversion runs as one process (dist_checkpointing reshards at load); "
                              "run it with python, not torchrun")
    hf_dir, model = plan.hf_dir, plan.model
    config = build_transformer_config(model=model, tensor=1, pipeline=1, precision="fp32")
    gpt = build_gpt(model=model, config=config, vocab_size=plan.vocab_rows, device=ctx.device)
    state = _ModelState(gpt)
    _, origin = hf_to_megatron(hf=read_hf_tensors(hf_dir), family=plan.family, model=model,
                               padded_vocab=plan.vocab_rows, source=str(hf_dir), out=state)
    state.check_complete(origin=origin, source=str(hf_dir))
    tokenizer = hf_tokenizer(hf_dir)
    if tokenizer is None:
        print(f"note: {hf_dir} has no tokenizer.json: the checkpoint carries no tokenizer (training from it then "
              "takes tokenizer.* from its config)")
    card = pivot_card.build_card(model=model, tokenizer=tokenizer, hf_config=plan.hf_config)
    return checkpointing.save_checkpoint(
        root=out, step=0, model_chunks=[gpt], optimizer=None, train_state=None, init_scores=None,
        write_extra=lambda directory: pivot_card.write_card(card, directory=directory))


class _ModelState(MutableMapping):
    """The pivot's own state as the converter's output: each converted tensor is copied into the model's as soon as
    it is made and then dropped, so a conversion holds the model once plus one tensor (not the HF copy, the
    converted copy and the model)."""

    def __init__(self, gpt: torch.nn.Module):
        # state_dict's tensors share their storage with the parameters: writing them fills the model
        self.expected = {name: tensor for name, tensor in gpt.state_dict().items()
                         if not name.endswith("_extra_state")}
        self.filled: set[str] = set()
        self.mismatched: dict[str, tuple[int, ...]] = {}

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        assert name in self.expected, f"adapter bug: the pivot has no {name}"
        if tensor.shape != self.expected[name].shape:
            self.mismatched[name] = tuple(tensor.shape)
            return
        with torch.no_grad():
            self.expected[name].copy_(tensor)
        self.filled.add(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.filled:
            raise KeyError(name)
        return self.expected[name]

    def __delitem__(self, name: str) -> None:
        raise TypeError("a converted tensor cannot be taken back")

    def __iter__(self):
        return iter(self.filled)

    def __len__(self) -> int:
        return len(self.filled)

    def check_complete(self, *, origin: dict[str, str], source: str) -> None:
        if self.mismatched:
            raise ConversionError("; ".join(
                f"{source}: {origin[name]} has shape {shape}; config.json implies {tuple(self.expected[name].shape)} "
                "for it" for name, shape in self.mismatched.items()))
        missing = set(self.expected) - self.filled
        assert not missing, f"adapter bug: {sorted(missing)}"


def load_pivot(*, ckpt: Path, ctx: ParallelContext):
    """(model chunks, card, iteration directory): the checkpoint's pivot at this process layout, weights loaded."""
    directory = checkpointing.resolve_checkpoint(ckpt)
    card = pivot_card.read_card(directory)
    if card is None:
        raise ConversionError(f"{directory}: no {pivot_card.CARD_FILE} (written by hf_to_mcore.py and by the trainer): "
                              "the checkpoint does not say which model it holds")
    config = build_transformer_config(model=card.model, tensor=ctx.tensor, pipeline=ctx.pipeline, precision="fp32")
    rows = pivot_card.stored_vocab_rows(directory)
    gpt = build_gpt(model=card.model, config=config, vocab_size=rows, device=ctx.device)
    checkpointing.load_checkpoint(path=directory, model_chunks=[gpt])
    gpt.eval()
    return [gpt], card, directory


def export_mcore_to_hf(*, ckpt: Path, out: Path, ctx: ParallelContext, dtype: str = "auto",
                       max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes config.json, the safetensors and the tokenizer files into `out`; returns the file names."""
    if ctx.world_size != 1:
        raise ConversionError("export runs as one process (the checkpoint reshards to TP 1 / PP 1 at load); "
                              "run it with python, not torchrun")
    chunks, card, directory = load_pivot(ckpt=ckpt, ctx=ctx)
    vocab = card.model.vocab_size
    if card.hf_config is not None:
        family = check_unchanged(model=card.model, hf_config=card.hf_config,
                                 source=str(directory / pivot_card.HF_CONFIG_FILE))
        hf_config = dict(card.hf_config)
    else:
        family, hf_config = llama_config_for(card.model, vocab_size=vocab)
    source_dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    dtype = source_dtype if dtype == "auto" else dtype
    if dtype not in _DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    hf_config["dtype"] = dtype
    hf_config.pop("torch_dtype", None)
    state = {name: tensor for name, tensor in chunks[0].state_dict().items() if not name.endswith("_extra_state")}
    tensors = megatron_to_hf(state=state, family=family, model=card.model, vocab_size=vocab)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files = ["config.json", *write_hf_tensors(tensors, out_dir=staging, max_shard_bytes=max_shard_bytes,
                                              dtype=_DTYPES[dtype])]
    files += pivot_card.copy_tokenizer_files(directory, out_dir=staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return files
