"""This rank's random-number generator states, as tensors: captured into a checkpoint, restored on resume.

Every generator a training step could draw from: torch's CPU generator, the current CUDA device's, Megatron's
model-parallel tracker (dropout inside tensor-parallel regions), Python's ``random`` and NumPy's global state.
Tensors only, so a checkpoint stores them as safetensors and nothing is unpickled on load.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

_TRACKER = "megatron/"


def capture_rng_state() -> dict[str, torch.Tensor]:
    """Name -> state tensor of every generator of this process."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states = {
        "torch": torch.get_rng_state(),
        "python/internal": torch.tensor(internal, dtype=torch.int64),
        "python/meta": torch.tensor([version, gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy/keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy/meta": torch.tensor([position, has_gauss, cached_gaussian], dtype=torch.float64),
    }
    if kind != "MT19937":
        raise RuntimeError(f"unexpected NumPy generator {kind}")
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    states.update({_TRACKER + name: state.cpu() for name, state in get_cuda_rng_tracker().get_states().items()})
    return {name: state.contiguous() for name, state in states.items()}


def restore_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Puts every generator back where ``capture_rng_state`` found it."""
    torch.set_rng_state(states["torch"])
    version, has_gauss, gauss = states["python/meta"].tolist()
    internal = tuple(int(value) for value in states["python/internal"].tolist())
    random.setstate((int(version), internal, gauss if has_gauss else None))
    position, numpy_has_gauss, cached_gaussian = states["numpy/meta"].tolist()
    np.random.set_state(("MT19937", states["numpy/keys"].numpy().astype(np.uint32), int(position),
                         int(numpy_has_gauss), cached_gaussian))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tracker = {name[len(_TRACKER):]: state for name, state in states.items() if name.startswith(_TRACKER)}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
