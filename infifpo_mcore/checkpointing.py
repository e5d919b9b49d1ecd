"""Megatron ``dist_checkpointing`` save/load of the pivot, its optimizer and the run's train state.

Layout of a checkpoint root::

    <root>/iter_0000010/        dist_checkpointing directory (model, optimizer) + train_state.json
                                + rng/tp{t}_pp{p}_dp{d}.safetensors (each rank's generator states)
                                + pivot_init_scores.safetensors: the pivot-init scores the trainer computed
                                  (``references.References.state_dict``)
    <root>/latest               text "iter_0000010", replaced atomically after the directory is complete

Crash safety: a save goes to ``iter_XXXXXXX.tmp``; when every rank has finished, rank 0 flushes it to disk, renames
it and then replaces ``latest``. A process killed at any point leaves ``latest`` naming a complete checkpoint; the
leftover ``*.tmp`` is never loaded and is removed by the next run (``remove_incomplete``). ``keep_last`` prunes
older published checkpoints after each save. A step that fails on one rank (rank 0's publish on a full or read-only
disk, a rank's own files) raises ``CheckpointError`` on every rank, naming the rank and the error: the ranks agree
after each step instead of meeting at a barrier the failed rank never reaches.

Untrusted files: torch's distributed checkpoint reader unpickles ``.metadata`` with plain ``pickle`` and the
non-tensor items of ``*.distcp`` with ``weights_only=False``; ``verify_checkpoint_files`` checks both (and every
``*.pt``) with allow-listing unpicklers first, so a crafted checkpoint is refused before anything runs its code.

Model tensors are stored per parameter, so a checkpoint loads into any TP/PP/DP layout; optimizer state likewise
(Megatron's per-parameter formats: ``fully_reshardable`` for the distributed optimizer). Before loading, the tensor
shapes stored are compared with the model's, so a checkpoint of another model shape or family is refused by name.

The two optimizers store Adam's moments under the same keys (``optimizer.state.exp_avg.<parameter>``) but their main
weights and step count differently, so a run with the distributed optimizer can resume a checkpoint of the plain one
and back (``parallel.distributed_optimizer: auto`` switches with the data-parallel size), and a bf16 run an fp32 one
(whose model weights are its main weights): ``_retarget_main_weights``, ``_other_optimizer_format``.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase
from megatron.core.distributed import DistributedDataParallel
from safetensors.torch import load_file, save_file

from infifpo_mcore.atomic_files import STAGING_SUFFIX, fsync_tree, write_atomically
from infifpo_mcore.checkpoint_layout import (ITERATION, LATEST, REPLACED_SUFFIX, CheckpointError,
                                             iteration_dir, resolve_checkpoint)
from infifpo_mcore.config import ConfigError
from infifpo_mcore.memory import STATE_BYTES, counted_precision
from infifpo_mcore.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
INIT_SCORES = "pivot_init_scores.safetensors"
RNG_DIR = "rng"
# Megatron's canonical per-parameter optimizer layout: a checkpoint resumes at any TP / PP / DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# Main (fp32) weights: the distributed optimizer's key prefix, the plain bf16 optimizer's; the plain fp32 optimizer
# steps the model's weights themselves and stores none.
_MAIN_WEIGHT_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")


def check_disk_space(*, root: Path, parameters: int, precision: str) -> None:
    """Refuses to start when the checkpoint disk cannot hold one checkpoint: the weights and the optimizer state
    (Adam's moments, + fp32 master weights in bf16) per parameter as memory.STATE_BYTES counts them."""
    weight_bytes, _, optimizer_bytes = STATE_BYTES[counted_precision(precision)]
    needed = parameters * (weight_bytes + optimizer_bytes)
    existing = next(parent for parent in (root, *root.parents) if parent.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ConfigError(
            f"checkpoint.save={root}: one checkpoint needs ~{needed / 2**30:.1f} GiB "
            f"({parameters:,} parameters), only {free / 2**30:.1f} GiB free on {existing}"
        )


def prepare_save_root(*, root: Path, model_chunks, data_size: int, precision: str, device: torch.device) -> None:
    """Collective over the training ranks, before a run's first save to ``root``: what a killed save left there goes
    (never published, never loaded), and a disk that cannot hold one checkpoint is refused at start."""
    if dist.get_rank() == 0:
        for path in remove_incomplete(root):
            logger.warning("removed %s: a save interrupted before it was published", path)
    local = sum(p.numel() for chunk in model_chunks for p in chunk.parameters())
    total = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(total)  # also: rank 0 has cleaned up before any rank saves
    # each data-parallel replica holds the whole model
    check_disk_space(root=root, parameters=int(total.item()) // data_size, precision=precision)


# ---------------------------------------------------------------------------------------------------------------------
# Publishing and cleaning up
def _publish(staging: Path, final: Path) -> None:
    """Rank 0: staging -> final, then the ``latest`` pointer (written beside and renamed: atomic)."""
    root = final.parent
    fsync_tree(staging)  # the data reach the disk before the rename publishes them
    latest = root / LATEST
    replaced = final.with_name(final.name + REPLACED_SUFFIX)
    if final.exists():
        # The published one (a new run re-saving a step of an old one) stays loadable under its second name until
        # the new one is in place; an unpublished one (left by a save killed between rename and pointer) just goes.
        if latest.is_file() and latest.read_text().strip() == final.name:
            final.rename(replaced)
        else:
            shutil.rmtree(final)
    staging.rename(final)
    write_atomically(latest, final.name)
    shutil.rmtree(replaced, ignore_errors=True)


def remove_incomplete(root: Path) -> list[Path]:
    """Removes what interrupted saves left in ``root`` (``*.tmp``: never published, never loaded); returns it.

    A published checkpoint set aside while a new save of its step was renamed in goes back to its name when that
    rename did not happen, and is removed when it did."""
    for replaced in sorted(root.glob("*" + REPLACED_SUFFIX)) if root.is_dir() else []:
        original = replaced.with_name(replaced.name.removesuffix(REPLACED_SUFFIX))
        if original.exists():
            shutil.rmtree(replaced)
        else:
            replaced.rename(original)
    leftovers = sorted(root.glob("*" + STAGING_SUFFIX)) if root.is_dir() else []
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return leftovers


def prune_checkpoints(root: Path, *, keep_last: int, published: Path) -> list[Path]:
    """Deletes published checkpoints older than the ``keep_last`` newest (``published`` counts and stays); returns
    them. Directories newer than ``published`` (left by an abandoned run) are not touched: a later save replaces
    them."""
    step = int(ITERATION.fullmatch(published.name).group(1))
    older = sorted((int(match.group(1)), path) for path in root.iterdir()
                   if (match := ITERATION.fullmatch(path.name)) and path.is_dir() and int(match.group(1)) < step)
    doomed = [path for _, path in older[: max(len(older) - (keep_last - 1), 0)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


# ---------------------------------------------------------------------------------------------------------------------
# Untrusted files: allow-listed unpickling before torch / Megatron unpickle them
def _allowed_global(module: str, name: str) -> bool:
    """What torch's distributed checkpoint metadata pickles: its own dataclasses and enums, torch sizes, dtypes."""
    if "." in name:  # a dotted name walks attributes: "metadata.os.system"
        return False
    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"):
        obj = getattr(__import__(module, fromlist=[name]), name, None)
        return isinstance(obj, type) and obj.__module__ == module
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                              ("torch.serialization", "_get_layout")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _allowed_global(module, name):
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint's metadata never holds")
        return super().find_class(module, name)


def verify_checkpoint_files(directory: Path):
    """Refuses (CheckpointError) a checkpoint whose pickled parts refer to anything beyond plain data; returns its
    torch distributed-checkpoint ``Metadata``, unpickled with the allow-list."""
    try:
        with open(directory / ".metadata", "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{directory / '.metadata'}: refused: {error}") from None
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{directory / '.metadata'}: refused: holds a {type(metadata).__name__}, not Metadata")
    blobs = {index.fqn: info for index, info in metadata.storage_data.items()}
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        info = blobs.get(key)
        if info is None or getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{directory}: refused: item {key!r} has no plain storage record")
        with open(directory / info.relative_path, "rb") as file:
            file.seek(info.offset)
            raw = file.read(info.length)
        _weights_only_load(io.BytesIO(raw), f"{directory / info.relative_path} item {key!r}")
    for path in sorted(directory.glob("*.pt")):
        _weights_only_load(path, str(path))
    return metadata


def _weights_only_load(source, where: str) -> None:
    try:
        torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever the unpickler objects to, the file is refused with it
        raise CheckpointError(f"{where}: refused: not loadable with torch.load(weights_only=True): "
                              f"{str(error).splitlines()[0]}") from None


def _check_shapes(directory: Path, metadata, template: dict, *, vocab_size: int | None) -> None:
    """Every model tensor is in the checkpoint with the model's global shape, else the checkpoint is refused.

    Vocabulary-sized tensors (Megatron marks them ``allow_shape_mismatch``) may differ in their padding, which
    depends on TP: their first dimension must only hold the ``vocab_size`` rows this run's tokenizer needs."""
    stored = metadata.state_dict_metadata
    expected = {tensor.key: tensor for tensor in nested_values(template["model"])
                if isinstance(tensor, ShardedTensor)}  # one key per stack of layers
    problems = []
    for key, tensor in expected.items():
        shape = tuple(tensor.global_shape)
        if key not in stored:
            problems.append(f"{key}: missing from the checkpoint")
            continue
        saved = tuple(stored[key].size)
        padded_vocab = tensor.allow_shape_mismatch and vocab_size is not None and len(saved) == len(shape)
        if padded_vocab and saved[1:] == shape[1:] and saved[0] >= vocab_size:
            continue
        if saved != shape:
            problems.append(f"{key}: shape {saved} in the checkpoint, {shape} in this model")
    if problems:
        raise CheckpointError(
            f"{directory} does not fit this model ({len(problems)} tensor(s)); it was saved from another model shape "
            "or family (compare the model.* and tokenizer.* settings of the run that wrote it):\n  "
            + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------------------------------
# Save / load
def _bare(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel of a DDP-wrapped chunk (training) or the chunk itself (``model.build_gpt``: the tools)."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _model_sharded_state_dict(model_chunks) -> dict:
    """The model's tensors under "model" (several chunks of a virtual pipeline: one entry each). Their keys are
    global (layer offsets included), so any layout, with or without a virtual pipeline, reads them."""
    if len(model_chunks) == 1:
        return {"model": _bare(model_chunks[0]).sharded_state_dict()}
    return {"model": {f"chunk{index}": _bare(chunk).sharded_state_dict() for index, chunk in enumerate(model_chunks)}}


def _load_model(model_chunks, loaded: dict) -> None:
    if len(model_chunks) == 1:
        _bare(model_chunks[0]).load_state_dict(loaded)
        return
    for index, chunk in enumerate(model_chunks):
        _bare(chunk).load_state_dict(loaded[f"chunk{index}"])


def _rng_file(directory: Path) -> Path:
    return directory / RNG_DIR / (f"tp{parallel_state.get_tensor_model_parallel_rank()}"
                                  f"_pp{parallel_state.get_pipeline_model_parallel_rank()}"
                                  f"_dp{parallel_state.get_data_parallel_rank()}.safetensors")


def _layout() -> dict[str, int]:
    return {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
            "data": parallel_state.get_data_parallel_world_size()}


def _together(action: Callable[[], None] | None, *, what: str) -> None:
    """Collective over the default group: runs this rank's part of a save step (None: it has none), then raises
    CheckpointError on every rank if any rank's part failed, naming those ranks and their errors."""
    error = None
    if action is not None:
        try:
            action()
        except Exception as caught:  # noqa: BLE001 - every failure of the step is reported to every rank
            logger.exception("%s failed on this rank", what)
            error = f"{type(caught).__name__}: {caught}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [f"rank {rank}: {message}" for rank, message in enumerate(errors) if message is not None]
    if failed:
        raise CheckpointError(f"{what} failed ({'; '.join(failed)})")


def save_checkpoint(
    *, root: Path, step: int, model_chunks, optimizer, train_state: dict | None,
    init_scores: dict[str, torch.Tensor] | None, keep_last: int | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every training rank calls it. Returns the published iteration directory.

    ``optimizer`` and ``train_state`` None save the model alone (a converted model); ``init_scores`` (on the rank
    that holds them) go to ``INIT_SCORES``; ``write_extra(directory)`` runs on rank 0 before the directory is
    published (the pivot card).
    """
    final = iteration_dir(root, step)
    staging = final.with_name(final.name + STAGING_SUFFIX)
    rank = dist.get_rank()

    def make_staging() -> None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    _together(make_staging if rank == 0 else None, what=f"creating {staging}")
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(state, str(staging))

    def write_own_files() -> None:
        if train_state is not None:  # a training run's: with its RNG states and train state, for an exact resume
            _rng_file(staging).parent.mkdir(exist_ok=True)  # after the save: it wants an empty directory
            save_file(capture_rng_state(), str(_rng_file(staging)))
            if rank == 0:
                (staging / TRAIN_STATE).write_text(
                    json.dumps({**train_state, "layout": _layout()}, indent=1, sort_keys=True))
        if rank == 0 and write_extra is not None:
            write_extra(staging)
        if init_scores is not None:
            save_file({k: v.contiguous().cpu() for k, v in init_scores.items()}, str(staging / INIT_SCORES))

    _together(write_own_files, what=f"writing {staging}")

    def publish() -> None:
        _publish(staging, final)
        if keep_last:
            for path in prune_checkpoints(root, keep_last=keep_last, published=final):
                logger.info("removed %s (checkpoint.keep_last=%d)", path, keep_last)

    _together(publish if rank == 0 else None, what=f"publishing {final}")
    return final


def load_checkpoint(*, path: Path, model_chunks, optimizer=None, vocab_size: int | None = None) -> dict:
    """Loads the model (and the optimizer and this rank's RNG states when given and present) into this layout;
    returns the train state. ``vocab_size``: the unpadded vocabulary, which lets the vocabulary padding differ.

    A model-only checkpoint (e.g. converted from HF) returns ``{}``: training starts at step 0 from those weights;
    a given optimizer's main weights (bf16: fp32 copies made when it was built) are refreshed from them.
    """
    directory = resolve_checkpoint(path)
    metadata = verify_checkpoint_files(directory)
    state_file = directory / TRAIN_STATE
    train_state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    template = _model_sharded_state_dict(model_chunks)
    _check_shapes(directory, metadata, template, vocab_size=vocab_size)
    with_optimizer = optimizer is not None and train_state.get("has_optimizer", False)
    converting, from_model = False, {}
    if with_optimizer:
        template["optimizer"] = optimizer.sharded_state_dict(template, is_loading=True, metadata=OPTIMIZER_METADATA)
        template["optimizer"], from_model = _retarget_main_weights(template["optimizer"],
                                                                    set(metadata.state_dict_metadata))
        converting = bool(from_model) or _is_distributed(template["optimizer"]) != _saved_distributed(metadata)
    loaded = dist_checkpointing.load(template, str(directory))
    _load_model(model_chunks, loaded["model"])
    if with_optimizer:
        state = loaded["optimizer"]
        if converting:
            # a key is read once per load: the model weights standing in for main weights get a load of their own
            weights = dist_checkpointing.load(from_model, str(directory)) if from_model else {}
            state = _other_optimizer_format(template["optimizer"], loaded["optimizer"], weights)
        optimizer.load_state_dict(state)
        _load_rng(directory, train_state)
    elif optimizer is not None:
        optimizer.reload_model_params()  # else the first step would write the built model's weights back
    return train_state


# ---------------------------------------------------------------------------------------------------------------------
# Resuming the plain optimizer's checkpoint with the distributed optimizer, and back
class _ModelWeight:
    """Stands in a template for a main weight read from the model weight (``name`` in the second load)."""

    def __init__(self, name: str):
        self.name = name


def _is_distributed(optimizer_state: dict) -> bool:
    return "param_state" in optimizer_state  # DistributedOptimizer.sharded_state_dict's per-parameter part


def _saved_distributed(metadata) -> bool:
    return any(key.startswith(_MAIN_WEIGHT_PREFIXES[0]) for key in metadata.state_dict_metadata)


def _retarget_main_weights(template, saved: set[str]) -> tuple[object, dict[str, ShardedBase]]:
    """``template`` with each main-weight tensor the checkpoint lacks reading the other optimizer's main weight of
    that parameter, or else the model weight itself (what a plain fp32 optimizer steps): those become
    ``_ModelWeight`` placeholders, returned beside it as ``{name: tensor}`` to load separately."""
    from_model = {}

    def retarget(node):
        if isinstance(node, dict):
            return {key: retarget(value) for key, value in node.items()}
        if isinstance(node, list):
            return [retarget(value) for value in node]
        # a ShardedTensor, or a ShardedTensorFactory (SwiGLU's fc1 weight: its two halves) building them
        key = node.key if isinstance(node, ShardedBase) and isinstance(getattr(node, "key", None), str) else ""
        prefix = next((p for p in _MAIN_WEIGHT_PREFIXES if key.startswith(p)), None)
        if prefix is None or key in saved:
            return node
        parameter = node.key.removeprefix(prefix)
        other = next((o + parameter for o in _MAIN_WEIGHT_PREFIXES if o != prefix and o + parameter in saved), None)
        if other is not None:
            node.key = other
            return node
        name = f"main_weight_{len(from_model)}"
        node.key = parameter
        from_model[name] = node
        return _ModelWeight(name)

    return retarget(template), from_model


def _adam_step(state: dict):
    """The Adam step count in a loaded optimizer state of either format (None where there is none)."""
    for node in (state, state.get("optimizer", {})):
        if "common_step" in node.get("state", {}):  # plain: one step for every parameter
            return node["state"]["common_step"]
        groups = node.get("param_groups", [])
        if groups and "step" in groups[0]:  # distributed: the step in each param group
            return groups[0]["step"]
    return None


def _graft(template, loaded, weights: dict):
    """``template`` with its tensors replaced by ``loaded``'s at the same place (or by ``weights[name]`` for a
    ``_ModelWeight``): this optimizer's own layout (param groups etc.), the checkpoint's values."""
    if isinstance(template, ShardedBase):
        return loaded
    if isinstance(template, _ModelWeight):
        return weights[template.name]
    if isinstance(template, LocalNonpersistentObject):
        return template.unwrap()
    if isinstance(template, dict):
        return {key: _graft(value, loaded.get(key) if isinstance(loaded, dict) else None, weights)
                for key, value in template.items()}
    if isinstance(template, list):
        return [_graft(value, loaded[index] if isinstance(loaded, list) and index < len(loaded) else None, weights)
                for index, value in enumerate(template)]
    return template


def _other_optimizer_format(template, loaded: dict, weights: dict) -> dict:
    """The checkpoint's optimizer tensors in this optimizer's layout, with the saved step count, which the two formats
    keep in different places."""
    state, step = _graft(template, loaded, weights), _adam_step(loaded)
    if step is None:
        return state
    if _is_distributed(state):
        for group in state["optimizer"]["param_groups"]:
            group["step"] = float(step)
    else:
        inner = state.get("optimizer", state)  # the bf16 optimizer nests torch's state dict one level down
        inner["state"]["common_step"] = torch.as_tensor(step, dtype=torch.float32)
    return state


def _load_rng(directory: Path, train_state: dict) -> None:
    """Same layout: each rank continues its own generators. Another layout has other generators (one per TP / PP
    rank), so they keep this run's seeding; the pivot has no dropout, so no value depends on them."""
    saved = train_state.get("layout")
    if saved == _layout() and _rng_file(directory).is_file():
        restore_rng_state(load_file(str(_rng_file(directory))))
    elif dist.get_rank() == 0:
        logger.info("RNG states not restored: %s was saved at layout %s, this run is %s", directory, saved, _layout())


def load_init_scores(path: Path) -> dict[str, torch.Tensor] | None:
    """The pivot-init scores saved with a checkpoint, or None (then the data carries them, or none were needed)."""
    file = resolve_checkpoint(path) / INIT_SCORES
    if not file.is_file():
        return None
    return load_file(str(file))
