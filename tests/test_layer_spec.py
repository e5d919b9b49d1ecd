"""Gemma 3's pieces of the pivot's layer against transformers' own modules, bit for bit, in fp32 and in bf16 (where a
different rounding order would show): the (1 + w) RMSNorm and the embedding scale. The whole layer is compared
through logits in tests/test_checkpoints_tools_conversion.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from infifpo_mcore.layer_spec import ZeroCenteredRMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_zero_centered_norm_equals_gemma3s(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    config = SimpleNamespace(layernorm_zero_centered_gamma=True, params_dtype=dtype, sequence_parallel=False)
    ours, theirs = ZeroCenteredRMSNorm(config, 640, eps=1e-6), Gemma3RMSNorm(640, eps=1e-6).to(dtype)
    assert not ours.weight.any()  # (1 + 0): the identity scale at init, as Gemma initialises it
    with torch.no_grad():
        ours.weight.copy_(torch.randn(640) * 0.5)
        theirs.weight.copy_(ours.weight)
    hidden = (torch.randn(3, 5, 640) * 20).to(dtype)
    assert torch.equal(ours(hidden), theirs(hidden))


def test_without_zero_centering_it_scales_by_the_weight():
    config = SimpleNamespace(layernorm_zero_centered_gamma=False, params_dtype=torch.float32, sequence_parallel=False)
    norm = ZeroCenteredRMSNorm(config, 8, eps=1e-6)
    hidden = torch.randn(2, 8)
    torch.testing.assert_close(norm(hidden), torch.nn.functional.rms_norm(hidden, (8,), eps=1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_embedding_scale_rounds_as_gemma3s(dtype):
    """sqrt(640) = 25.298...: Gemma rounds it to fp32 then to the weights' dtype (25.25 in bf16)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from infifpo_mcore.model import _scale_embedding_output

    torch.manual_seed(0)
    theirs = Gemma3TextScaledWordEmbedding(50, 640, padding_idx=0, embed_scale=640 ** 0.5).to(dtype)
    ids = torch.randint(0, 50, (2, 7))
    plain = torch.nn.functional.embedding(ids, theirs.weight)
    ours = _scale_embedding_output(SimpleNamespace(config=SimpleNamespace(hidden_size=640)), (ids,), plain)
    assert torch.equal(ours, theirs(ids))
