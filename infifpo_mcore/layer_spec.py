"""The pivot's transformer layer spec: Megatron-Core's own, or, for what those cannot compute (Gemma 3's layer), one
assembled from Megatron-Core modules plus three minimal subclasses.

Megatron-Core's GPT specs already express head sizes of their own (``kv_channels``), query/key RMSNorm
(``qk_layernorm``), an attention scale (``softmax_scale``), sliding-window attention in chosen layers
(``window_size`` + ``window_attn_skip_freq``, local and TE attention alike) and gated GeLU. Gemma 3's layer also has

- RMSNorms that scale by (1 + weight), computed in fp32 (``ZeroCenteredRMSNorm``; Megatron's local norm is
  ``torch.nn.RMSNorm``, which refuses ``layernorm_zero_centered_gamma``);
- a norm on the attention output and on the MLP output before each residual add (``PostNormRowParallelLinear``: the
  output projection followed by that norm, so the layer's residual adds stay Megatron's);
- a RoPE base of its own in the sliding-window layers (``LocalRopeSelfAttention``: those layers rotate queries and
  keys with their own table instead of the model's).

That spec uses Megatron-Core's local modules on every device (no Transformer Engine, hence no FP8: refused by name
in the config). The embedding scale (x sqrt(hidden_size)) is a forward hook set in ``model.build_gpt``.

Both local specs (Megatron's, Gemma's) take their self-attention and core attention from ``attention.py``:
Megatron's classes, which also run packed micro-batches (``packing``); Transformer Engine's spec is Megatron's own
and runs them through its THD path. That is the one spec choice between the two packed-attention paths.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import is_layer_window_attention

from infifpo_mcore.attention import PackedDotProductAttention, PackedSelfAttention
from infifpo_mcore.config import ModelConfig
from infifpo_mcore.rope import plain_frequencies


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm scaling by (1 + weight) when ``config.layernorm_zero_centered_gamma`` (else by weight), in fp32 and
    cast back, as Gemma computes it. Same constructor as Megatron's norms."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.one = 1.0 if config.layernorm_zero_centered_gamma else 0.0
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 1.0 - self.one, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (self.one + self.weight.float())).type_as(hidden)


class PostNormRowParallelLinear(RowParallelLinear):
    """The output projection followed by an RMSNorm of its (reduced) output: Gemma's post-attention and
    post-feed-forward norm, which come before the residual add. Its weight is ``post_layernorm.weight``."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        assert self.bias is None or not self.skip_bias_add, "the norm must follow the bias"
        self.post_layernorm = ZeroCenteredRMSNorm(config, output_size, eps=config.layernorm_epsilon)

    def forward(self, input_: torch.Tensor):
        output, bias = super().forward(input_)
        return self.post_layernorm(output), bias


class LocalRopeSelfAttention(PackedSelfAttention):
    """Self-attention whose sliding-window layers (``config.window_attn_skip_freq``) rotate queries and keys with a
    RoPE table of their own (base ``local_rotary_base``, unscaled) instead of the model's; full-attention layers
    use the model's."""

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, *, local_rotary_base: float | None = None,
                 **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, **kwargs)
        self.local_rotary = None
        if local_rotary_base is not None and is_layer_window_attention(config.window_size,
                                                                       config.window_attn_skip_freq, layer_number):
            self.local_rotary = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                                use_cpu_initialization=config.use_cpu_initialization)
            table = plain_frequencies(dim=config.kv_channels, base=local_rotary_base)
            self.local_rotary.inv_freq = table.to(self.local_rotary.inv_freq.device)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if self.local_rotary is not None and rotary_pos_emb is not None:
            rotary_pos_emb = self.local_rotary(rotary_pos_emb.shape[0])  # [S, 1, 1, D] like the model's
        # packed: PackedSelfAttention then takes each token's position from this table
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


def own_block_spec(*, model: ModelConfig, config: TransformerConfig,
                   vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This stage's layers (and final norm) built from Megatron-Core's local modules and the classes above."""
    norm = ZeroCenteredRMSNorm
    output_projection = PostNormRowParallelLinear if model.post_norms else RowParallelLinear
    attention_params = {"attn_mask_type": AttnMaskType.causal, "local_rotary_base": model.local_rotary_base}
    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=LocalRopeSelfAttention,
                params=attention_params,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=PackedDotProductAttention,
                    linear_proj=output_projection,
                    q_layernorm=norm if model.qk_layernorm else IdentityOp,
                    k_layernorm=norm if model.qk_layernorm else IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=output_projection)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=norm)


def megatron_spec(*, model: ModelConfig, config: TransformerConfig, transformer_engine: bool) -> ModuleSpec:
    """Megatron-Core's GPT layer spec: Transformer Engine's, or its local one with the attention of
    ``attention.py`` (Megatron's own classes, which also run packed micro-batches)."""
    if transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=None, moe_grouped_gemm=False, qk_layernorm=model.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=config.normalization,
                                                    qk_layernorm=model.qk_layernorm)
    attention = spec.submodules.self_attention
    packed = replace(attention, module=PackedSelfAttention,
                     submodules=replace(attention.submodules, core_attention=PackedDotProductAttention))
    return replace(spec, submodules=replace(spec.submodules, self_attention=packed))
