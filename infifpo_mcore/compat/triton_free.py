"""``import megatron.core`` without Triton (torch's CPU wheels do not install it), for megatron-core >= 0.19.

megatron-core 0.19 imports its MoE paged-stash Triton kernels (``transformer/moe/ops/paged_stash.py``: ``import
triton`` and two ``@triton.jit`` functions) from ``pipeline_parallel/schedules.py``, so every ``import megatron.core``
needs Triton, although only a GPU MoE run ever launches those kernels. Triton is 286 MB and unused here; instead,
where it is not installed, a meta-path finder gives that one module a stand-in with the same names whose kernels
raise when launched. Nothing changes where Triton is installed (every GPU image) or in releases without the module.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

_MODULE = "megatron.core.transformer.moe.ops.paged_stash"
_BLOCK_SIZE = 1024  # the module's GLOBAL_BLOCK_SIZE, read by its caller when it configures a launch


class _TritonMissing:
    """A kernel that cannot run: indexing it with a launch grid and calling it raises."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{_MODULE}.{self.name} is a Triton kernel (MoE paged stash) and Triton is not installed")


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == _MODULE else None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__doc__ = __doc__
        module.GLOBAL_BLOCK_SIZE = _BLOCK_SIZE
        module.paged_stash_copy_kernel = _TritonMissing("paged_stash_copy_kernel")
        module.paged_stash_pop_kernel = _TritonMissing("paged_stash_pop_kernel")
        module.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]


def install() -> None:
    """Where Triton is missing, before megatron is imported: the stand-in module (once per process)."""
    if importlib.util.find_spec("triton") is None and not any(isinstance(f, _StandIn) for f in sys.meta_path):
        sys.meta_path.insert(0, _StandIn())
