"""Replacing a Megatron-Core attribute, loudly: the shims patch names a release may rename or drop.

A patch whose target is missing must stop the process with the symbol and the release in the message, not leave the
shim silently inactive (the failure would then surface far away, as a CUDA call on a CPU or a wrong resume).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any


class MissingPatchTarget(RuntimeError):
    """A symbol the compat layer patches is not in the installed megatron-core."""


def megatron_core_version() -> str:
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def target(owner: Any, name: str, *, why: str) -> Any:
    """``owner.name``, or MissingPatchTarget naming it (``why``: what the patch is for)."""
    if not hasattr(owner, name):
        where = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", repr(owner))
        module = getattr(owner, "__module__", None)
        symbol = f"{module}.{where}.{name}" if module and module != where else f"{where}.{name}"
        raise MissingPatchTarget(
            f"megatron-core {megatron_core_version()} has no {symbol}, which infifpo_mcore.compat patches ({why}); "
            "this release is outside the tested range (setup.py): install one inside it, or adapt the compat module")
    return getattr(owner, name)
