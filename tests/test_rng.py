"""Every generator state survives a round trip through tensors (and a safetensors file)."""

import random

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from infifpo_mcore.rng import capture_rng_state, restore_rng_state


def draw() -> list[float]:
    return [*torch.rand(2).tolist(), random.random(), random.gauss(0, 1), float(np.random.rand()),
            float(np.random.randn())]


def test_restored_generators_draw_the_same_numbers_again(tmp_path):
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    save_file(capture_rng_state(), str(tmp_path / "rng.safetensors"))
    expected = draw()
    assert draw() != expected
    restore_rng_state(load_file(str(tmp_path / "rng.safetensors")))
    assert draw() == expected
