"""Small random-initialised HF causal LMs with the shape features of real ones (GQA, tied or untied embeddings,
QKV bias, fused projections, sliding window), built by transformers without any weights download."""

from __future__ import annotations

from pathlib import Path

import torch

# name -> (transformers config / model class prefix, config fields beyond the common small shape)
TINY_FAMILIES = {
    # SmolLM2-like: tied embeddings, rope base 1e5; vocabulary 300 is padded (to 384) inside the pivot
    "llama_tied": ("Llama", dict(tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5, vocab_size=300)),
    "llama": ("Llama", dict(tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5)),
    # Qwen2.5-0.5B-like: tied, QKV bias, rope base 1e6
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    # Mistral-7B-v0.1-like: 4:1 GQA, a sliding window longer than the sequences
    "mistral": ("Mistral", dict(num_attention_heads=8, sliding_window=64, max_position_embeddings=256)),
    # Phi-4-like: fused qkv_proj and gate_up_proj, untied
    "phi3": ("Phi3", dict(tie_word_embeddings=False, rope_theta=250000.0, pad_token_id=0, eos_token_id=2)),
}
_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)


def build_tiny_hf(directory: Path, *, family: str, seed: int = 0, **changes) -> Path:
    """Saves the model (fp32 safetensors + config.json) into `directory`. Every weight is random, norms around 1 and
    biases around 0 included, so that a tensor mapped to the wrong place changes the logits."""
    import transformers

    prefix, fields = TINY_FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(**(_COMMON | fields | changes))
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(directory)
    return directory
