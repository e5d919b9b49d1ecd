"""One small adapter per HF model family: how its tensor names and fused layouts map onto Megatron-Core's GPTModel.

Megatron's layer tensors (local and TE specs name them alike)::

    embedding.word_embeddings.weight                              [V_padded, H]
    decoder.layers.{}.input_layernorm.weight                      [H]
    decoder.layers.{}.self_attention.linear_qkv.weight            [G * (Q/G + 2) * D, H]  per query group g:
                                                                  [q heads of g..., k_g, v_g], D = head dim
    decoder.layers.{}.self_attention.linear_qkv.bias              [G * (Q/G + 2) * D]     (add_qkv_bias)
    decoder.layers.{}.self_attention.linear_proj.weight           [H, Q * D]
    decoder.layers.{}.pre_mlp_layernorm.weight                    [H]
    decoder.layers.{}.mlp.linear_fc1.weight                       [2 * F, H]  gated (SwiGLU, GeGLU): [gate; up]
    decoder.layers.{}.mlp.linear_fc2.weight                       [H, F]
    decoder.final_layernorm.weight                                [H]
    output_layer.weight                                           [V_padded, H]  (absent with tied embeddings)

Qwen3 and Gemma 3 add ``self_attention.{q,k}_layernorm.weight`` [D]; Gemma 3 also
``self_attention.linear_proj.post_layernorm.weight`` and ``mlp.linear_fc2.post_layernorm.weight`` [H] (its norms
of the attention and MLP outputs), its norm weights w applied as (1 + w), stored as HF stores them.

HF keeps q/k/v either apart (Llama, Qwen2, Mistral: ``q_proj``, ``k_proj``, ``v_proj``) or fused as one
``qkv_proj`` = [all q; all k; all v] (Phi-3); likewise gate/up apart or fused as ``gate_up_proj`` = [gate; up].
Megatron's tensor-parallel split is along rows, so its per-group QKV order is what keeps each TP shard whole groups;
its checkpoint stores linear_fc1 split into gate and up so that any TP can load it.

Names are ``{}``-templated on the layer index; ``Family.one_to_one`` maps tensors copied unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MEGATRON_QKV = "decoder.layers.{}.self_attention.linear_qkv.{}"
MEGATRON_FC1 = "decoder.layers.{}.mlp.linear_fc1.weight"
MEGATRON_EMBEDDING = "embedding.word_embeddings.weight"
MEGATRON_OUTPUT = "output_layer.weight"
HF_EMBEDDING = "model.embed_tokens.weight"
HF_OUTPUT = "lm_head.weight"

# Tensors whose names only differ (Megatron -> HF), shared by every supported family.
_COMMON = {
    "decoder.layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "decoder.layers.{}.self_attention.linear_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "decoder.layers.{}.pre_mlp_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "decoder.layers.{}.mlp.linear_fc2.weight": "model.layers.{}.mlp.down_proj.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}
HF_SPLIT_QKV = {"q": "model.layers.{}.self_attn.q_proj.{}", "k": "model.layers.{}.self_attn.k_proj.{}",
              "v": "model.layers.{}.self_attn.v_proj.{}"}
HF_FUSED_QKV = "model.layers.{}.self_attn.qkv_proj.{}"
HF_SPLIT_GATE_UP = {"gate": "model.layers.{}.mlp.gate_proj.weight", "up": "model.layers.{}.mlp.up_proj.weight"}
HF_FUSED_GATE_UP = "model.layers.{}.mlp.gate_up_proj.weight"


@dataclass(frozen=True)
class Family:
    """How one HF architecture's checkpoint is laid out."""

    name: str
    architecture: str  # the HF class `config.json` names in `architectures`
    fused_qkv: bool = False
    fused_gate_up: bool = False
    one_to_one: dict[str, str] = field(default_factory=lambda: dict(_COMMON))


# Query / key RMSNorms (Qwen3, Gemma 3), one [D] weight shared by the heads.
_QK_NORMS = {
    "decoder.layers.{}.self_attention.q_layernorm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "decoder.layers.{}.self_attention.k_layernorm.weight": "model.layers.{}.self_attn.k_norm.weight",
}
# Gemma 3: four norms per layer. HF's post_attention_layernorm is the norm of the attention output here (Llama's
# name for the pre-MLP norm); the post-norms live inside the output projections of infifpo_mcore/layer_spec.py.
_GEMMA3 = {
    "decoder.layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "decoder.layers.{}.self_attention.linear_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "decoder.layers.{}.self_attention.linear_proj.post_layernorm.weight":
        "model.layers.{}.post_attention_layernorm.weight",
    "decoder.layers.{}.pre_mlp_layernorm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "decoder.layers.{}.mlp.linear_fc2.weight": "model.layers.{}.mlp.down_proj.weight",
    "decoder.layers.{}.mlp.linear_fc2.post_layernorm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    **_QK_NORMS,
}

FAMILIES = {
    "llama": Family(name="llama", architecture="LlamaForCausalLM"),
    "qwen2": Family(name="qwen2", architecture="Qwen2ForCausalLM"),
    "qwen3": Family(name="qwen3", architecture="Qwen3ForCausalLM", one_to_one=_COMMON | _QK_NORMS),
    "mistral": Family(name="mistral", architecture="MistralForCausalLM"),
    "phi3": Family(name="phi3", architecture="Phi3ForCausalLM", fused_qkv=True, fused_gate_up=True),
    "gemma3_text": Family(name="gemma3_text", architecture="Gemma3ForCausalLM", one_to_one=_GEMMA3),
}


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    groups: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups


def qkv_to_megatron(*, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """HF q [Q*D, ...], k [G*D, ...], v [G*D, ...] (weights or biases) -> Megatron's per-group [q..., k, v] rows."""
    rest = q.shape[1:]
    per_group = [q.reshape(shape.groups, shape.heads_per_group * shape.head_dim, *rest),
                 k.reshape(shape.groups, shape.head_dim, *rest), v.reshape(shape.groups, shape.head_dim, *rest)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def qkv_from_megatron(qkv: torch.Tensor, *, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_to_megatron`: (q, k, v) in HF's row order."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(shape.groups, (shape.heads_per_group + 2) * shape.head_dim, *rest)
    q, k, v = grouped.split([shape.heads_per_group * shape.head_dim, shape.head_dim, shape.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def split_fused_qkv(qkv: torch.Tensor, *, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phi-3's qkv_proj [all q; all k; all v] -> (q, k, v)."""
    kv_rows = shape.groups * shape.head_dim
    return tuple(qkv.split([shape.heads * shape.head_dim, kv_rows, kv_rows], dim=0))
