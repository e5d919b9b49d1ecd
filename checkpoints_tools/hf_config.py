"""HF ``config.json`` <-> the pivot's ``ModelConfig``: derived field by field, or refused by name.

The HF config is read through transformers' own config class, so defaults and legacy spellings (``rope_theta`` /
``rope_scaling`` before transformers 5, ``rope_parameters`` after) resolve exactly as the HF model resolves them.
Whatever the pivot (Megatron-Core GPTModel: RMSNorm, gated MLP, causal attention with an optional sliding window,
RoPE plain or linear / llama3-scaled; Gemma 3's layer through ``infifpo_mcore/layer_spec.py``) cannot compute
identically is refused with the field's name; nothing is approximated.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from infifpo_mcore.config import Activation, ModelConfig, Normalization, RopeScaling
from checkpoints_tools.families import FAMILIES, Family


class ConversionError(ValueError):
    """Input the converter refuses: the message names the file and the field or tensor."""


SUPPORTED = ", ".join(f"{name} ({family.architecture})" for name, family in FAMILIES.items())
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_REFUSED_TYPES = {"gemma3": "Gemma-3 with its vision tower (Gemma3ForConditionalGeneration): convert a text-only "
                            "Gemma3ForCausalLM (model_type gemma3_text, e.g. Gemma-3-270M / 1B)"}
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
    ("use_bidirectional_attention", (False, None)),
]
# HF activation (hidden_act, or Gemma's hidden_activation) -> the pivot's gated MLP
_ACTIVATIONS = {"silu": Activation.swiglu, "gelu_pytorch_tanh": Activation.geglu_tanh}
_ROPE_TYPES = {"default": RopeScaling.none, "linear": RopeScaling.linear, "llama3": RopeScaling.llama3}
_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _gemma3_fields(config) -> dict[str, Any]:
    return dict(scale_embeddings=True, zero_centered_norms=True, post_norms=True, qk_layernorm=True,
                softmax_scale=config.query_pre_attn_scalar ** -0.5)


# What a family computes beyond the common decoder (GQA, RMSNorm, gated MLP, RoPE, tied or untied embeddings).
_FAMILY_FIELDS = {
    "qwen2": lambda config: dict(add_qkv_bias=True),  # q/k/v projections always carry a bias, o_proj none
    "qwen3": lambda config: dict(qk_layernorm=True),
    "gemma3_text": _gemma3_fields,
}


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


def _rope_parameters(config, layer_type: str) -> dict[str, Any]:
    """The RoPE settings of `layer_type` layers, wherever this transformers version keeps them (``rope_parameters``,
    per layer type for Gemma 3, since transformers 5; ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq``
    before)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    elif layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
        return {"rope_type": "default", "rope_theta": config.rope_local_base_freq}  # transformers < 5, unscaled
    else:
        params.update(dict(getattr(config, "rope_scaling", None) or {}))  # transformers < 5
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.setdefault("rope_theta", getattr(config, "rope_theta", None))
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return params


def _rope_fields(config, *, windowed: bool, problems: list[str]) -> dict[str, Any]:
    """rotary_base, the RoPE scaling of full-attention layers and the base of sliding-window ones."""
    rope = _rope_parameters(config, "full_attention")
    fields: dict[str, Any] = {"rotary_base": float(rope["rope_theta"])}
    scaling = _ROPE_TYPES.get(rope["rope_type"])
    if scaling is None:
        problems.append(f"rope scaling type {rope['rope_type']!r} (rope_parameters / rope_scaling; supported: "
                        f"{', '.join(_ROPE_TYPES)})")
    elif scaling != RopeScaling.none:
        fields.update(rope_scaling=scaling, rope_scaling_factor=float(rope["factor"]))
    if scaling == RopeScaling.llama3:
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    if rope["partial_rotary_factor"] not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (the pivot rotates whole heads)")
    local = _rope_parameters(config, "sliding_attention")
    if windowed and (local["rope_theta"] != rope["rope_theta"] or scaling != RopeScaling.none):
        if local["rope_type"] != "default":
            problems.append(f"rope scaling type {local['rope_type']!r} in sliding-window layers (the pivot scales "
                            "only the full-attention layers' RoPE)")
        fields["local_rotary_base"] = float(local["rope_theta"])
    return fields


def _window_fields(config, *, num_layers: int, limit: int, problems: list[str]) -> dict[str, Any]:
    """sliding_window and window_layers: HF's window in the layers its layer_types mark (all when it has none)."""
    layer_types = getattr(config, "layer_types", None)  # None: the window (if any) is in every layer
    if layer_types is not None and (set(layer_types) - _LAYER_TYPES or len(layer_types) != num_layers):
        problems.append(f"layer_types {layer_types} (the pivot has one of {sorted(_LAYER_TYPES)} per layer)")
        return {}
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):  # Qwen2/3 keep a window that only this turns on
        window = None
    windowed = None if layer_types is None else [kind == "sliding_attention" for kind in layer_types]
    if window is None or window >= limit or (windowed is not None and not any(windowed)):
        return {}  # no layer's window is ever shorter than a sequence the pivot accepts
    return {"sliding_window": int(window), "window_layers": None if windowed is None or all(windowed) else windowed}


def derive_pivot(*, hf_config: dict[str, Any], source: str) -> tuple[Family, ModelConfig]:
    """The family adapter and the pivot's ModelConfig for this HF config; `source` names the file in messages."""
    model_type = hf_config.get("model_type")
    if model_type in _REFUSED_TYPES:
        raise ConversionError(f"{source}: model_type {model_type!r} is not supported: {_REFUSED_TYPES[model_type]}. "
                              f"Supported: {SUPPORTED}")
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
    hidden, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    groups = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    if act not in _ACTIVATIONS:
        problems.append(f"hidden_act={act!r} (the pivot's gated MLP takes {', '.join(map(repr, _ACTIVATIONS))})")
    limit = config.max_position_embeddings
    window = _window_fields(config, num_layers=layers, limit=limit, problems=problems)
    rope = _rope_fields(config, windowed=bool(window), problems=problems)
    if problems:
        raise ConversionError(f"{source}: the converter cannot honour: " + "; ".join(problems))
    vocab = config.vocab_size
    model = ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=config.intermediate_size,
        vocab_size=vocab,
        seq_length=limit,
        normalization=Normalization.RMSNorm,
        activation=_ACTIVATIONS[act],
        tie_embeddings=bool(config.tie_word_embeddings),
        init_method_std=float(getattr(config, "initializer_range", 0.02)),
        make_vocab_size_divisible_by=stable_vocab_multiple(vocab),
        norm_epsilon=float(config.rms_norm_eps),
        max_position_embeddings=limit,
        kv_channels=head_dim if head_dim * heads != hidden else None,
        **rope, **window, **_FAMILY_FIELDS.get(model_type, lambda _: {})(config),
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


# Pivot fields no generated config expresses (a pivot with Gemma's layer comes from a Gemma config.json it keeps)
_NO_GENERATED_COUNTERPART = ("scale_embeddings", "zero_centered_norms", "post_norms", "local_rotary_base",
                             "softmax_scale", "window_layers")


def _generated_class(model: ModelConfig) -> str:
    """The HF family a pivot made here exports as: Qwen2 (QKV bias), Qwen3 (q/k norms), Mistral (a sliding window in
    every layer) or Llama."""
    if model.add_qkv_bias and model.qk_layernorm:
        raise ConversionError("model.add_qkv_bias with model.qk_layernorm: no HF family here has both")
    if model.sliding_window is not None and (model.add_qkv_bias or model.qk_layernorm):
        raise ConversionError("model.sliding_window with model.add_qkv_bias / model.qk_layernorm: only a Mistral "
                              "(neither) is generated with a window")
    if model.add_qkv_bias:
        return "qwen2"
    if model.qk_layernorm:
        return "qwen3"
    return "mistral" if model.sliding_window is not None else "llama"


def llama_config_for(model: ModelConfig, *, vocab_size: int) -> tuple[Family, dict[str, Any]]:
    """An HF config for a pivot that did not come from HF (e.g. trained from scratch): Llama, or Qwen2 / Qwen3 /
    Mistral where the pivot has their feature (``_generated_class``), with its head size and RoPE scaling. Refused
    when the pivot's shape has no such counterpart."""
    import transformers

    refused = [f"model.{key}={getattr(model, key)!r}" for key in _NO_GENERATED_COUNTERPART
               if getattr(model, key) not in (None, False)]
    if model.normalization != Normalization.RMSNorm or model.activation != Activation.swiglu:
        refused.insert(0, f"model.normalization={model.normalization}, model.activation={model.activation}")
    if refused:
        raise ConversionError(f"{', '.join(refused)}: only the Llama shape (RMSNorm, swiglu; q/k norms, QKV bias, a "
                              "sliding window, RoPE scaling) has a generated HF counterpart here")
    name = _generated_class(model)
    family = FAMILIES[name]
    config_class = getattr(transformers, family.architecture.replace("ForCausalLM", "Config"))
    rope = {"rope_type": "default", "rope_theta": model.rotary_base}
    if model.rope_scaling != RopeScaling.none:
        rope.update(rope_type=str(model.rope_scaling), factor=model.rope_scaling_factor)
    if model.rope_scaling == RopeScaling.llama3:
        rope.update(low_freq_factor=model.rope_low_freq_factor, high_freq_factor=model.rope_high_freq_factor,
                    original_max_position_embeddings=model.rope_original_max_position_embeddings)
    config = config_class(
        vocab_size=vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, rms_norm_eps=model.norm_epsilon,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        tie_word_embeddings=model.tie_embeddings, initializer_range=model.init_method_std, rope_parameters=rope,
        head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
        **({"sliding_window": model.sliding_window} if name == "mistral" else {}),
    )
    config.architectures = [family.architecture]
    raw = config.to_dict()
    check_unchanged(model=replace(model, vocab_size=vocab_size,
                                  make_vocab_size_divisible_by=stable_vocab_multiple(vocab_size),
                                  max_position_embeddings=config.max_position_embeddings),
                    hf_config=raw, source="the generated HF config")
    return family, raw
