"""The pivot's RoPE frequency tables equal transformers' for the same config, entry for entry (not only logits at short
lengths): Llama 3.x's llama3 scaling, linear scaling, and Gemma 3's two bases."""

from __future__ import annotations

import pytest
import torch

from checkpoints_tools.hf_config import derive_pivot
from infifpo_mcore.rope import inverse_frequencies, plain_frequencies
from tests.test_checkpoints_tools_families import GEMMA3_270M, LLAMA31_8B, LLAMA32_1B, SMOLLM2_135M

TINY_LLAMA3 = SMOLLM2_135M | dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=64))
GEMMA3_4B_TEXT = GEMMA3_270M | dict(rope_scaling=dict(rope_type="linear", factor=8.0))  # 4B / 12B / 27B text RoPE


def _transformers_table(raw: dict, layer_type: str | None = None) -> torch.Tensor:
    """The inv_freq buffer transformers' own rotary module builds for this config."""
    from transformers import AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = {"llama": LlamaRotaryEmbedding, "gemma3_text": Gemma3RotaryEmbedding}[raw["model_type"]]
    module = rotary(AutoConfig.for_model(**raw))
    return getattr(module, f"{layer_type}_inv_freq" if layer_type else "inv_freq")


@pytest.mark.parametrize("raw", [LLAMA31_8B, LLAMA32_1B, TINY_LLAMA3, SMOLLM2_135M | dict(
    rope_scaling=dict(rope_type="linear", factor=4.0))], ids=["llama-3.1-8b", "llama-3.2-1b", "shrunk", "linear"])
def test_scaled_tables_equal_transformers_bit_for_bit(raw):
    _, model = derive_pivot(hf_config=raw, source="config.json")
    ours, reference = inverse_frequencies(model), _transformers_table(raw)
    assert ours.dtype == reference.dtype == torch.float32 and torch.equal(ours, reference)
    assert not torch.equal(ours, plain_frequencies(dim=ours.numel() * 2, base=model.rotary_base))  # it is scaled


def test_the_shrunk_llama3_table_has_all_three_bands():
    """The tiny Llama-3 of the conversion tests (head_dim 16 there, 64 here) keeps, blends and divides frequencies."""
    _, model = derive_pivot(hf_config=TINY_LLAMA3, source="config.json")
    plain = plain_frequencies(dim=64, base=model.rotary_base)
    ratio = plain / inverse_frequencies(model)
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


def test_megatron_own_llama3_scaling_agrees_where_its_constants_are_the_config():
    """Megatron-Core's RotaryEmbedding(rope_scaling=True) fixes low / high / original to 1 / 4 / 8192: Llama 3.1's."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    _, model = derive_pivot(hf_config=LLAMA31_8B, source="config.json")
    megatron = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=500000, rope_scaling=True,
                               rope_scaling_factor=8.0, use_cpu_initialization=True)
    torch.testing.assert_close(megatron.inv_freq, inverse_frequencies(model), rtol=0, atol=1e-12)


@pytest.mark.parametrize("raw", [GEMMA3_270M, GEMMA3_4B_TEXT], ids=["270m", "4b-text-rope"])
def test_gemma3_global_and_local_tables_equal_transformers(raw):
    _, model = derive_pivot(hf_config=raw, source="config.json")
    assert torch.equal(inverse_frequencies(model), _transformers_table(raw, "full_attention"))
    local = plain_frequencies(dim=model.kv_channels, base=model.local_rotary_base)
    assert torch.equal(local, _transformers_table(raw, "sliding_attention"))
