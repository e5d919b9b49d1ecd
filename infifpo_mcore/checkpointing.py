"""Megatron ``dist_checkpointing`` save/load of the pivot, its optimizer and the run's train state.

Layout of a checkpoint root::

    <root>/iter_0000010/        dist_checkpointing directory (model, optimizer) + train_state.json
                                + pivot_init_scores.safetensors when the trainer computed them itself
    <root>/latest               text "iter_0000010", replaced atomically after the directory is complete

A save goes to ``iter_XXXXXXX.tmp`` first and is renamed when every rank has finished, so a crash mid-save never
leaves a directory that looks complete. Model tensors are stored per parameter, so a checkpoint loads into any
TP/PP/DP layout; optimizer state likewise (Megatron's per-parameter formats: ``fully_reshardable`` for the distributed optimizer).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

LATEST = "latest"
TRAIN_STATE = "train_state.json"
INIT_SCORES = "pivot_init_scores.safetensors"
# Megatron's canonical per-parameter optimizer layout: a checkpoint resumes at any TP / PP / DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def resolve_checkpoint(path: Path) -> Path:
    """A root with a ``latest`` pointer or an ``iter_*`` directory itself -> the iteration directory to load."""
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "metadata.json").is_file():
        raise CheckpointError(
            f"{path} is not a dist_checkpointing directory (no metadata.json, and no '{LATEST}' pointer beside it)"
        )
    return path


def _model_sharded_state_dict(model_chunks) -> dict:
    (chunk,) = model_chunks
    return {"model": chunk.module.sharded_state_dict()}


def save_checkpoint(
    *, root: Path, step: int, model_chunks, optimizer, train_state: dict | None,
    init_scores: dict[str, torch.Tensor] | None, write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every training rank calls it. Returns the published iteration directory.

    ``optimizer`` and ``train_state`` None save the model alone (a converted model); ``write_extra(directory)`` runs
    on rank 0 before the directory is published (the pivot card).
    """
    final = iteration_dir(root, step)
    staging = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(state, str(staging))
    if rank == 0 and train_state is not None:
        (staging / TRAIN_STATE).write_text(json.dumps(train_state, indent=1, sort_keys=True))
    if rank == 0 and write_extra is not None:
        write_extra(staging)
    if init_scores is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in init_scores.items()}, str(staging / INIT_SCORES))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
    dist.barrier()
    return final


def load_checkpoint(*, path: Path, model_chunks, optimizer=None) -> dict:
    """Loads the model (and the optimizer when given and present) into this layout; returns the train state.

    A model-only checkpoint (e.g. converted from HF) returns ``{}``: training starts at step 0 from those weights.
    """
    directory = resolve_checkpoint(path)
    state_file = directory / TRAIN_STATE
    train_state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    template = _model_sharded_state_dict(model_chunks)
    with_optimizer = optimizer is not None and train_state.get("has_optimizer", False)
    if with_optimizer:
        template["optimizer"] = optimizer.sharded_state_dict(template, is_loading=True, metadata=OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(template, str(directory))
    model_chunks[0].module.load_state_dict(loaded["model"])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    return train_state


def load_init_scores(path: Path) -> dict[str, torch.Tensor] | None:
    """The pivot-init scores saved with a checkpoint, or None (then the data carries them, or none were needed)."""
    file = resolve_checkpoint(path) / INIT_SCORES
    if not file.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(file))
