"""HF ``config.json`` <-> the pivot's ``ModelConfig``: derived field by field, or refused by name.

The HF config is read through transformers' own config class, so defaults and legacy spellings (``rope_theta`` /
``rope_scaling`` before transformers 5, ``rope_parameters`` after) resolve exactly as the HF model resolves them.
Whatever the pivot (Megatron-Core GPTModel: pre-RMSNorm, SwiGLU, full causal attention, RoPE with one base)
cannot compute identically is refused with the field's name; nothing is approximated.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from infifpo_mcore.config import Activation, ModelConfig, Normalization
from checkpoints_tools.families import FAMILIES, Family


class ConversionError(ValueError):
    """Input the converter refuses: the message names the file and the field or tensor."""


SUPPORTED = ", ".join(f"{name} ({family.architecture})" for name, family in FAMILIES.items())
# What Gemma-3's text decoder computes that the pivot's GPT layer cannot (Megatron-Core's local and TE GPT specs).
GEMMA3_UNSUPPORTED = [
    "the embedding output multiplied by sqrt(hidden_size)",
    "post-attention and post-feed-forward RMSNorms inside every layer (post_attention_layernorm, "
    "post_feedforward_layernorm: 4 norms per layer, the GPT layer has 2)",
    "sliding-window layers (layer_types 'sliding_attention', sliding_window) with their own rotary base "
    "(rope_local_base_freq) beside global layers: one model has one rotary base",
]
# Also Gemma-3, expressible in Megatron-Core but not wired into the pivot's config: listed so the gap is complete.
GEMMA3_ALSO_NEEDED = ["head_dim != hidden_size / num_attention_heads", "attention scale 1/sqrt(query_pre_attn_scalar)",
                      "GeGLU with tanh-approximated gelu", "RMSNorm on queries and keys", "RMSNorm weights as (1 + w)"]
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_REFUSED_TYPES = {"gemma3_text": "Gemma-3", "gemma3": "Gemma-3"}
# Every config.json key that changes the computation and has a neutral value the pivot equals: (key, neutral values).
_NEUTRAL = [
    ("attention_bias", (False, None)),
    ("mlp_bias", (False, None)),
    ("attn_logit_softcapping", (None,)),
    ("final_logit_softcapping", (None,)),
    ("logits_scaling", (None, 1, 1.0)),
    ("embedding_multiplier", (None, 1, 1.0)),
    ("residual_multiplier", (None, 1, 1.0)),
    ("attention_multiplier", (None,)),
]


def stable_vocab_multiple(vocab_size: int) -> int:
    """``make_vocab_size_divisible_by`` that keeps the padded vocabulary equal at TP 1, 2, 4 and 8.

    The pivot pads the vocabulary to a multiple of this × TP; a checkpoint's embedding only loads where that padded
    size equals the stored one. The largest power of two up to 128 with vocab % (8 × it) == 0 pads HF's vocabulary
    to itself at every TP up to 8; a vocabulary not divisible by 8 keeps Megatron's 128 (the padding then depends on
    TP, and a checkpoint loads at the TP sizes that pad alike).
    """
    for multiple in (128, 64, 32, 16, 8, 4, 2, 1):
        if vocab_size % (8 * multiple) == 0:
            return multiple
    return 128


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: not found (--hf must be a HF model directory with config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON: {error}") from None


def _hf_config_object(raw: dict[str, Any], source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, TypeError, KeyError) as error:
        raise ConversionError(f"{source}: transformers cannot read this config: {error}") from None


def _rope(config) -> dict[str, Any]:
    """rope_type, rope_theta and partial_rotary_factor, wherever this transformers version keeps them."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})  # transformers < 5
    return {
        "rope_type": params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default",
        "rope_theta": params.get("rope_theta", getattr(config, "rope_theta", None)),
        "partial_rotary_factor": params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)),
    }


def _refuse_gemma3(raw: dict[str, Any], source: str) -> None:
    raise ConversionError(
        f"{source}: model_type {raw['model_type']!r} ({_REFUSED_TYPES[raw['model_type']]}) is not supported: the "
        "pivot's Megatron-Core GPT layer cannot express " + "; ".join(GEMMA3_UNSUPPORTED)
        + f". (It would also need: {', '.join(GEMMA3_ALSO_NEEDED)}.) Supported: {SUPPORTED}"
    )


def derive_pivot(*, hf_config: dict[str, Any], source: str) -> tuple[Family, ModelConfig]:
    """The family adapter and the pivot's ModelConfig for this HF config; `source` names the file in messages.

    ``max_position_embeddings`` is HF's, lowered to an active sliding window (the pivot attends to the whole
    sequence, which equals windowed attention only while the sequence fits in the window).
    """
    model_type = hf_config.get("model_type")
    if model_type in _REFUSED_TYPES:
        _refuse_gemma3(hf_config, source)
    if model_type not in FAMILIES:
        raise ConversionError(f"{source}: model_type {model_type!r} is not supported; supported: {SUPPORTED}")
    family = FAMILIES[model_type]
    architectures = hf_config.get("architectures") or [family.architecture]
    if architectures != [family.architecture]:
        raise ConversionError(f"{source}: architectures {architectures} is not supported; for model_type "
                              f"{model_type!r} only {family.architecture} (a causal LM head) converts")
    missing = [key for key in _REQUIRED if key not in hf_config]
    if missing:  # transformers would fill in its class defaults: shapes must come from the file
        raise ConversionError(f"{source}: missing field(s) {', '.join(missing)}")
    config = _hf_config_object(hf_config, source)
    problems = []
    for key, neutral in _NEUTRAL:
        if hf_config.get(key) not in neutral:
            problems.append(f"{key}={hf_config[key]!r} (the pivot has no such term; supported: {neutral[0]!r})")
    hidden, heads = config.hidden_size, config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        problems.append(f"head_dim={head_dim} with hidden_size={hidden} and num_attention_heads={heads} "
                        f"(the pivot's head size is hidden_size / num_attention_heads = {hidden / heads:g})")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (the pivot's gated MLP is SwiGLU: 'silu')")
    rope = _rope(config)
    if rope["rope_type"] != "default":
        problems.append(f"rope scaling type {rope['rope_type']!r} (rope_parameters / rope_scaling; the pivot "
                        "applies plain RoPE)")
    if rope["partial_rotary_factor"] not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (the pivot rotates whole heads)")
    limit = config.max_position_embeddings
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types - {"full_attention", "sliding_attention"}:
        problems.append(f"layer_types {sorted(layer_types)} (the pivot has causal full attention only)")
    window = getattr(config, "sliding_window", None)
    # Qwen2 keeps a sliding_window in every config but applies it only where use_sliding_window turns it on.
    window_active = model_type != "qwen2" or "sliding_attention" in layer_types or bool(
        getattr(config, "use_sliding_window", False))
    if window is not None and window_active and window < limit:
        limit = window
    if problems:
        raise ConversionError(f"{source}: the converter cannot honour: " + "; ".join(problems))
    vocab = config.vocab_size
    model = ModelConfig(
        num_layers=config.num_hidden_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=config.intermediate_size,
        vocab_size=vocab,
        seq_length=limit,
        normalization=Normalization.RMSNorm,
        activation=Activation.swiglu,
        rotary_base=float(rope["rope_theta"]),
        tie_embeddings=bool(config.tie_word_embeddings),
        init_method_std=float(getattr(config, "initializer_range", 0.02)),
        make_vocab_size_divisible_by=stable_vocab_multiple(vocab),
        add_qkv_bias=model_type == "qwen2",  # Qwen2's q/k/v projections always carry a bias, o_proj none
        norm_epsilon=float(config.rms_norm_eps),
        max_position_embeddings=limit,
    )
    return family, model


# Fields a trained pivot may differ in from its HF origin without changing the architecture.
_RUN_FIELDS = {"seq_length", "init_method_std"}


def check_unchanged(*, model: ModelConfig, hf_config: dict[str, Any], source: str) -> Family:
    """The family of `hf_config`, after checking that `model` (a checkpoint's pivot) still has its architecture."""
    family, derived = derive_pivot(hf_config=hf_config, source=source)
    for item in fields(ModelConfig):
        if item.name not in _RUN_FIELDS and getattr(model, item.name) != getattr(derived, item.name):
            raise ConversionError(f"{source}: model.{item.name} is {getattr(model, item.name)!r} in the checkpoint "
                                  f"but {getattr(derived, item.name)!r} in the HF config it was converted from")
    return family


def llama_config_for(model: ModelConfig, *, vocab_size: int) -> tuple[Family, dict[str, Any]]:
    """An HF config for a pivot that did not come from HF (e.g. trained from scratch): Llama, or Qwen2 with a QKV
    bias. Refused when the pivot's shape has no HF Llama counterpart."""
    from transformers import LlamaConfig, Qwen2Config

    if model.normalization != Normalization.RMSNorm or model.activation != Activation.swiglu:
        raise ConversionError(f"model.normalization={model.normalization}, model.activation={model.activation}: only "
                              "the Llama shape (RMSNorm, swiglu) has an HF counterpart here")
    config_class = Qwen2Config if model.add_qkv_bias else LlamaConfig
    config = config_class(
        vocab_size=vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, rms_norm_eps=model.norm_epsilon,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        tie_word_embeddings=model.tie_embeddings, initializer_range=model.init_method_std,
        rope_theta=model.rotary_base,
    )
    config.architectures = [config_class.__name__.replace("Config", "ForCausalLM")]
    family = FAMILIES["qwen2" if model.add_qkv_bias else "llama"]
    raw = config.to_dict()
    check_unchanged(model=replace(model, vocab_size=vocab_size,
                                  make_vocab_size_divisible_by=stable_vocab_multiple(vocab_size),
                                  max_position_embeddings=config.max_position_embeddings),
                    hf_config=raw, source="the generated HF config")
    return family, raw
