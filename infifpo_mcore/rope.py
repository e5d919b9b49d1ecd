"""RoPE's inverse frequencies for the pivot, computed as HF transformers computes them for the same config.

Megatron-Core's ``RotaryEmbedding`` builds the plain table ``1 / base^(2i / d)`` and, with ``rope_scaling=True``,
Llama 3.1's rescaling with its constants fixed (low / high frequency factors 1 and 4, original context 8192). A
converted model may set any of those (Llama 3.2 1B/3B use factor 32; tests shrink the context), so the pivot's table
is computed here from ``ModelConfig`` and set on the model's rotary embedding: a stretched table that differs from
the source's in one entry would train a subtly different model without any error.

    linear  every frequency divided by the factor (positions interpolated)
    llama3  wavelength 2 pi / f above original / low_freq_factor: f / factor; below original / high_freq_factor: f;
            between: (1 - s) f / factor + s f with s = (original / wavelength - low) / (high - low)
"""

from __future__ import annotations

import math

import torch

from infifpo_mcore.config import ModelConfig, RopeScaling, head_dim


def plain_frequencies(*, dim: int, base: float) -> torch.Tensor:
    """[dim / 2] fp32: 1 / base^(2i / dim), as transformers' default RoPE (int64 arange, then float)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(frequencies: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    factor, low, high = model.rope_scaling_factor, model.rope_low_freq_factor, model.rope_high_freq_factor
    original = model.rope_original_max_position_embeddings
    wavelength = 2 * math.pi / frequencies
    scaled = torch.where(wavelength > original / low, frequencies / factor, frequencies)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(medium, blended, scaled)


def _linear(frequencies: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    return frequencies / model.rope_scaling_factor


_SCALINGS = {RopeScaling.none: lambda frequencies, model: frequencies, RopeScaling.linear: _linear,
             RopeScaling.llama3: _llama3}


def inverse_frequencies(model: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] fp32: the table of the layers with ``model.rotary_base`` (all but Gemma 3's local ones, whose
    own base is unscaled: ``layer_spec.LocalRopeSelfAttention``)."""
    plain = plain_frequencies(dim=head_dim(model), base=model.rotary_base)
    return _SCALINGS[model.rope_scaling](plain, model)
