"""Small random-initialised HF causal LMs with the shape features of real ones (GQA, tied or untied embeddings,
QKV bias, fused projections, head sizes of their own, q/k norms, RoPE scaling, sliding windows, Gemma 3's layer),
built from each family's own transformers config class without any weights download."""

from __future__ import annotations

from pathlib import Path

import torch

# Sequences the conversion tests compare: longer than every tiny sliding window and original RoPE context below.
LONGEST = 70
# name -> (transformers config class, model class, config fields beyond the common small shape)
TINY_FAMILIES = {
    # SmolLM2-like: tied embeddings, rope base 1e5; vocabulary 300 is padded (to 384) inside the pivot
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM",
                   dict(tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5, vocab_size=300)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=500000.0,
                                                      rms_norm_eps=1e-5)),
    # Llama-3.1-like: llama3 RoPE scaling, the original context shrunk to 64 tokens so that its 8 frequencies fall in
    # all three bands (kept, blended, divided) and the compared sequences run past it
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))),
    # Qwen2.5-0.5B-like: tied, QKV bias, rope base 1e6
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0,
                                                      rms_norm_eps=1e-6)),
    # Qwen3-0.6B-like: q/k norms, head_dim 32 != hidden / heads = 16, tied, no bias
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0,
                                                      rms_norm_eps=1e-6)),
    # Mistral-7B-v0.1-like: 4:1 GQA, a sliding window shorter than the longest sequence
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=8, sliding_window=32,
                                                            max_position_embeddings=256)),
    # Mistral-Nemo / Small-like: head_dim 32 != hidden / heads = 16, no window
    "mistral_nemo": ("MistralConfig", "MistralForCausalLM", dict(head_dim=32, sliding_window=None,
                                                                 rope_theta=1000000.0)),
    # Phi-4-like: fused qkv_proj and gate_up_proj, untied
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, rope_theta=250000.0, pad_token_id=0,
                                                   eos_token_id=2)),
    # Gemma-3-like: sliding-window (base 1e4) and global (base 1e6, linear x8 as in the 4B+) layers alternating,
    # head_dim 32, attention scale 24^-0.5, gelu-tanh, 4 norms per layer and q/k norms, (1 + w), tied
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=16, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters=dict(full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
                             sliding_attention=dict(rope_type="default", rope_theta=10000.0)))),
}
_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)


# Families whose RMSNorms scale by (1 + w): their random norm weights are centred on 0, so that each norm scales by
# about 1 as elsewhere (centred on 1 they would double the activations at every one of Gemma's four norms a layer)
_ZERO_CENTERED_NORMS = {"Gemma3ForCausalLM"}


def build_tiny_hf(directory: Path, *, family: str, seed: int = 0, **changes) -> Path:
    """Saves the model (fp32 safetensors + config.json) into `directory`. Every weight is random, norms around their
    identity and biases around 0 included, so that a tensor mapped to the wrong place changes the logits."""
    import transformers

    config_class, model_class, fields = TINY_FAMILIES[family]
    config = getattr(transformers, config_class)(**(_COMMON | fields | changes))
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    norm_center = 0.0 if model_class in _ZERO_CENTERED_NORMS else 1.0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1 + (norm_center if "norm" in name else 0.0))
    model.save_pretrained(directory)
    return directory
