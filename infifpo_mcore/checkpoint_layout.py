"""The layout of a checkpoint root, read without Megatron (the entry point checks paths before importing it)::

    <root>/iter_0000010/    one checkpoint (``checkpointing`` writes and reads what is inside)
    <root>/latest           text "iter_0000010": the newest complete checkpoint, replaced atomically after it

``resolve_checkpoint`` turns what a user names (a root or an iteration directory) into the directory to load.
"""

from __future__ import annotations

import re
from pathlib import Path

from infifpo_mcore.atomic_files import STAGING_SUFFIX
from infifpo_mcore.refusals import Refusal

LATEST = "latest"
REPLACED_SUFFIX = ".replaced"
ITERATION = re.compile(r"iter_(\d{7})")


class CheckpointError(Refusal, RuntimeError):
    label = "checkpoint error"


def iteration_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def iteration_step(directory: Path) -> int:
    """The step of an iteration directory (``iter_0000010`` -> 10; a set-aside ``.replaced`` one too)."""
    return int(ITERATION.match(directory.name).group(1))


def resolve_checkpoint(path: Path) -> Path:
    """A root with a ``latest`` pointer or an ``iter_*`` directory itself -> the iteration directory to load."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / LATEST).is_file():
        target = (path / LATEST).read_text().strip()
        if (path / (target + REPLACED_SUFFIX)).is_dir() and not (path / target).exists():
            target += REPLACED_SUFFIX  # killed while a new save of this step replaced it: the old one is whole
        if not ITERATION.match(target) or not (path / target).is_dir():
            raise CheckpointError(f"{path / LATEST} names {target!r}, which is not a checkpoint directory beside it")
        path = path / target
    if path.name.endswith(STAGING_SUFFIX):
        raise CheckpointError(f"{path} is an unfinished save (its writer stopped before publishing it); load the "
                              f"checkpoint root or a published iter_* directory instead")
    if not (path / "metadata.json").is_file():
        raise CheckpointError(
            f"{path} is not a dist_checkpointing directory (no metadata.json, and no '{LATEST}' pointer beside it)"
        )
    return path
