"""Family adapters and the HF config -> pivot derivation, without processes: Megatron's QKV order, what each real
config derives to, and every refusal naming its file and field."""

from __future__ import annotations

import pytest
import torch

from checkpoints_tools.conversion import check_layout
from checkpoints_tools.families import FAMILIES, AttentionShape, qkv_from_megatron, qkv_to_megatron, split_fused_qkv
from checkpoints_tools.hf_config import ConversionError, derive_pivot, stable_vocab_multiple
from checkpoints_tools.weights import hf_to_megatron
from infifpo_mcore.config import ModelConfig

SOURCE = "/models/x/config.json"
# The fields of real config.json files (as published, legacy rope_theta / rope_scaling spelling included).
SMOLLM2_135M = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
                    hidden_act="silu", attention_bias=False, mlp_bias=False, rope_scaling=None)
QWEN25_05B = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
                  intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
                  sliding_window=32768, use_sliding_window=False, max_window_layers=21, hidden_act="silu")
MISTRAL_7B_V01 = dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      max_position_embeddings=32768, sliding_window=4096, hidden_act="silu")
LLAMA31_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072,
                  hidden_act="silu", attention_bias=False, mlp_bias=False, head_dim=128,
                  rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192, rope_type="llama3"))
LLAMA32_1B = LLAMA31_8B | dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                               tie_word_embeddings=True, rope_scaling=LLAMA31_8B["rope_scaling"] | dict(factor=32.0))
QWEN3_06B = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
                 intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, rope_theta=1000000.0, rope_scaling=None, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 max_position_embeddings=40960, sliding_window=None, use_sliding_window=False, max_window_layers=28,
                 attention_bias=False, hidden_act="silu")
MISTRAL_NEMO = dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=131072, hidden_size=5120,
                    intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    max_position_embeddings=1024000, sliding_window=None, hidden_act="silu")
MISTRAL_SMALL_24B = MISTRAL_NEMO | dict(intermediate_size=32768, rope_theta=100000000.0, max_position_embeddings=32768)
# As published (transformers 4 spelling: rope_theta, rope_local_base_freq, the window pattern and layer_types)
GEMMA3_270M = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=262144, hidden_size=640,
                   intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                   head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768,
                   query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_local_base_freq=10000.0, rope_scaling=None,
                   rope_theta=1000000.0, sliding_window=512, _sliding_window_pattern=6, attention_bias=False,
                   attn_logit_softcapping=None, final_logit_softcapping=None, use_bidirectional_attention=False,
                   layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, tie_word_embeddings=True)
GEMMA3_1B = GEMMA3_270M | dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, layer_types=None,
                               sliding_window_pattern=6)
PHI4 = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=100352, hidden_size=5120,
            intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
            rope_theta=250000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=16384,
            original_max_position_embeddings=16384, sliding_window=None, rope_scaling=None, hidden_act="silu",
            pad_token_id=100349, eos_token_id=100265, bos_token_id=100257)


# --- Megatron's QKV layout ----------------------------------------------------------------------------------------

def test_qkv_rows_are_grouped_per_query_group_q_heads_then_k_then_v():
    shape = AttentionShape(heads=6, groups=2, head_dim=3)  # 3 query heads per group
    q, k, v = torch.arange(18.0), 100 + torch.arange(6.0), 200 + torch.arange(6.0)
    got = qkv_to_megatron(q=q, k=k, v=v, shape=shape)
    expected = torch.cat([q[0:9], k[0:3], v[0:3], q[9:18], k[3:6], v[3:6]])
    assert torch.equal(got, expected)
    weights = [torch.randn(18, 5), torch.randn(6, 5), torch.randn(6, 5)]
    for back, original in zip(qkv_from_megatron(qkv_to_megatron(q=weights[0], k=weights[1], v=weights[2],
                                                                shape=shape), shape=shape), weights):
        assert torch.equal(back, original)
    fused = torch.cat(weights)  # Phi-3's qkv_proj
    assert all(torch.equal(a, b) for a, b in zip(split_fused_qkv(fused, shape=shape), weights))


# --- derivation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    (SMOLLM2_135M, dict(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                        ffn_hidden_size=1536, vocab_size=49152, rotary_base=100000.0, tie_embeddings=True,
                        add_qkv_bias=False, norm_epsilon=1e-5, max_position_embeddings=8192,
                        make_vocab_size_divisible_by=128)),
    (QWEN25_05B, dict(num_query_groups=2, add_qkv_bias=True, norm_epsilon=1e-6, tie_embeddings=True,
                      max_position_embeddings=32768, make_vocab_size_divisible_by=16)),  # 151936 = 1187 x 128
    (MISTRAL_7B_V01, dict(num_query_groups=8, tie_embeddings=False, max_position_embeddings=32768,
                          sliding_window=4096, window_layers=None)),  # the window in every layer
    (PHI4, dict(num_layers=40, num_attention_heads=40, num_query_groups=10, ffn_hidden_size=17920,
                rotary_base=250000.0, tie_embeddings=False, max_position_embeddings=16384)),
    (LLAMA31_8B, dict(num_query_groups=8, kv_channels=None, rotary_base=500000.0, rope_scaling="llama3",
                      rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_max_position_embeddings=8192, max_position_embeddings=131072,
                      make_vocab_size_divisible_by=32)),  # 128256 = 501 x 256
    (LLAMA32_1B, dict(hidden_size=2048, kv_channels=None, rope_scaling_factor=32.0, tie_embeddings=True)),
    (QWEN3_06B, dict(num_attention_heads=16, num_query_groups=8, kv_channels=128, qk_layernorm=True,
                     add_qkv_bias=False, sliding_window=None, tie_embeddings=True, rope_scaling="none")),
    (MISTRAL_NEMO, dict(kv_channels=128, sliding_window=None, max_position_embeddings=1024000)),
    (MISTRAL_SMALL_24B, dict(kv_channels=128, ffn_hidden_size=32768, rotary_base=1e8)),
    (GEMMA3_270M, dict(num_layers=18, hidden_size=640, num_attention_heads=4, num_query_groups=1, kv_channels=256,
                       activation="geglu_tanh", qk_layernorm=True, softmax_scale=1 / 16, rotary_base=1e6,
                       local_rotary_base=1e4, rope_scaling="none", sliding_window=512,
                       window_layers=([True] * 5 + [False]) * 3, scale_embeddings=True, zero_centered_norms=True,
                       post_norms=True, tie_embeddings=True, norm_epsilon=1e-6, max_position_embeddings=32768)),
    (GEMMA3_1B, dict(num_layers=26, kv_channels=256, window_layers=([True] * 5 + [False]) * 4 + [True] * 2,
                     local_rotary_base=1e4)),
], ids=["smollm2-135m", "qwen2.5-0.5b", "mistral-7b-v0.1", "phi-4", "llama-3.1-8b", "llama-3.2-1b", "qwen3-0.6b",
        "mistral-nemo", "mistral-small-24b", "gemma-3-270m", "gemma-3-1b"])
def test_real_configs_derive_the_pivot(raw, expected):
    family, model = derive_pivot(hf_config=raw, source=SOURCE)
    assert family is FAMILIES[raw["model_type"]]
    assert {key: getattr(model, key) for key in expected} == pytest.approx(expected)
    assert model.seq_length == model.max_position_embeddings


def test_the_stable_vocab_multiple_pads_alike_at_every_tensor_size_up_to_8():
    for vocab in (49152, 151936, 32000, 32064, 100352, 128256):
        multiple = stable_vocab_multiple(vocab)
        assert all(-(-vocab // (multiple * tp)) * multiple * tp == vocab for tp in (1, 2, 4, 8)), vocab
    assert stable_vocab_multiple(50257) == 128  # odd: Megatron's default, padding then depends on TP


@pytest.mark.parametrize("raw, fragments", [
    (SMOLLM2_135M | dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8192)),
     ["rope scaling type 'yarn'", "supported: default, linear, llama3"]),
    (LLAMA31_8B | dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), ["rope scaling type 'dynamic'"]),
    (PHI4 | dict(partial_rotary_factor=0.75), ["partial_rotary_factor=0.75"]),  # Phi-4-mini
    (SMOLLM2_135M | dict(attention_bias=True), ["attention_bias=True"]),
    (SMOLLM2_135M | dict(mlp_bias=True), ["mlp_bias=True"]),
    (SMOLLM2_135M | dict(hidden_act="gelu"), ["hidden_act='gelu'"]),
    (SMOLLM2_135M | dict(final_logit_softcapping=30.0), ["final_logit_softcapping=30.0"]),
    ({key: value for key, value in SMOLLM2_135M.items() if key != "intermediate_size"},
     ["missing field(s) intermediate_size"]),
    (SMOLLM2_135M | dict(model_type="gpt2"), ["model_type 'gpt2' is not supported", "phi3 (Phi3ForCausalLM)"]),
    (SMOLLM2_135M | dict(architectures=["LlamaForSequenceClassification"]),
     ["architectures ['LlamaForSequenceClassification'] is not supported"]),
    (GEMMA3_270M | dict(attn_logit_softcapping=50.0), ["attn_logit_softcapping=50.0"]),  # Gemma-2 style
    (GEMMA3_270M | dict(use_bidirectional_attention=True), ["use_bidirectional_attention=True"]),
    (GEMMA3_270M | dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
     ["model_type 'gemma3' is not supported: Gemma-3 with its vision tower", "gemma3_text (Gemma3ForCausalLM)"]),
    (GEMMA3_270M | dict(hidden_activation="gelu"), ["hidden_act='gelu'"]),
    (GEMMA3_270M | dict(rope_scaling=dict(rope_type="yarn", factor=8.0)), ["rope scaling type 'yarn'"]),
])
def test_what_the_pivot_cannot_compute_is_refused_by_name(raw, fragments):
    with pytest.raises(ConversionError) as caught:
        derive_pivot(hf_config=raw, source=SOURCE)
    message = str(caught.value)
    assert message.startswith(SOURCE + ": ")
    for fragment in fragments:
        assert fragment in message, message


def test_qwen2_sliding_window_counts_only_when_turned_on():
    _, model = derive_pivot(hf_config=QWEN25_05B | dict(use_sliding_window=True, sliding_window=4096,
                                                          max_window_layers=0), source=SOURCE)
    assert (model.sliding_window, model.window_layers, model.max_position_embeddings) == (4096, None, 32768)
    _, model = derive_pivot(hf_config=QWEN25_05B | dict(use_sliding_window=True, sliding_window=4096,
                                                          max_window_layers=21), source=SOURCE)
    assert model.window_layers == [False] * 21 + [True] * 3  # the layers from max_window_layers on
    _, model = derive_pivot(hf_config=QWEN25_05B, source=SOURCE)  # its window 32768 is never turned on
    assert model.sliding_window is None


def test_a_window_no_accepted_sequence_reaches_is_not_carried():
    _, model = derive_pivot(hf_config=MISTRAL_7B_V01 | dict(sliding_window=32768), source=SOURCE)
    assert model.sliding_window is None and model.max_position_embeddings == 32768


@pytest.mark.parametrize("tensor, pipeline, fragment", [
    (4, 1, "model.num_query_groups (2) must be divisible by parallel.tensor (4)"),
    (1, 3, "model.num_layers (2) must be divisible by parallel.pipeline (3)"),
])
def test_a_layout_the_model_cannot_be_split_into_is_refused_at_conversion(tensor, pipeline, fragment):
    model = ModelConfig(num_layers=2, num_attention_heads=4, num_query_groups=2)
    with pytest.raises(ConversionError, match=f"--tp {tensor} --pp {pipeline} cannot hold this model") as caught:
        check_layout(model=model, tensor=tensor, pipeline=pipeline)
    assert fragment in str(caught.value)


# --- weights ------------------------------------------------------------------------------------------------------

def _llama_tensors(model: ModelConfig) -> dict[str, torch.Tensor]:
    hidden, ffn, kv = model.hidden_size, model.ffn_hidden_size, model.num_query_groups * 16
    tensors = {"model.embed_tokens.weight": torch.randn(model.vocab_size, hidden),
               "model.norm.weight": torch.randn(hidden)}
    for layer in range(model.num_layers):
        prefix = f"model.layers.{layer}."
        tensors.update({
            prefix + "self_attn.q_proj.weight": torch.randn(hidden, hidden),
            prefix + "self_attn.k_proj.weight": torch.randn(kv, hidden),
            prefix + "self_attn.v_proj.weight": torch.randn(kv, hidden),
            prefix + "self_attn.o_proj.weight": torch.randn(hidden, hidden),
            prefix + "mlp.gate_proj.weight": torch.randn(ffn, hidden),
            prefix + "mlp.up_proj.weight": torch.randn(ffn, hidden),
            prefix + "mlp.down_proj.weight": torch.randn(hidden, ffn),
            prefix + "input_layernorm.weight": torch.randn(hidden),
            prefix + "post_attention_layernorm.weight": torch.randn(hidden),
        })
    return tensors


@pytest.mark.parametrize("change, fragment", [
    ("extra", "cannot honour (the pivot has no place for them): model.layers.0.self_attn.o_proj.bias"),
    ("missing", "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    ("untied_head", "tie_word_embeddings is true but lm_head.weight differs"),
    ("vocab", "model.embed_tokens.weight has shape (100, 64), config.json says vocab_size x hidden_size = (96, 64)"),
])
def test_weights_the_adapter_cannot_place_are_refused_by_name(change, fragment):
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                        vocab_size=96, tie_embeddings=True)
    tensors = _llama_tensors(model)
    if change == "extra":
        tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    elif change == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif change == "untied_head":
        tensors["lm_head.weight"] = torch.randn(96, 64)
    else:
        tensors["model.embed_tokens.weight"] = torch.randn(100, 64)
    with pytest.raises(ConversionError, match="^/models/x: ") as caught:
        hf_to_megatron(hf=tensors, family=FAMILIES["llama"], model=model, padded_vocab=128, source="/models/x")
    assert fragment in str(caught.value)


def test_a_tied_checkpoint_storing_the_head_twice_converts_and_the_vocabulary_is_padded():
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                        vocab_size=96, tie_embeddings=True)
    tensors = _llama_tensors(model)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    state, _ = hf_to_megatron(hf=tensors, family=FAMILIES["llama"], model=model, padded_vocab=128, source="x")
    embedding = state["embedding.word_embeddings.weight"]
    assert embedding.shape == (128, 64) and torch.equal(embedding[:96], tensors["model.embed_tokens.weight"])
    assert not embedding[96:].any() and "output_layer.weight" not in state


def test_a_pivot_made_here_without_an_hf_counterpart_is_refused_by_name():
    from checkpoints_tools.hf_config import llama_config_for

    gemma_like = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=96, vocab_size=96, zero_centered_norms=True, post_norms=True)
    with pytest.raises(ConversionError, match=r"model.zero_centered_norms=True, model.post_norms=True: only the Llama "
                                              r"shape"):
        llama_config_for(gemma_like, vocab_size=96)
    both = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                       vocab_size=96, add_qkv_bias=True, qk_layernorm=True)
    with pytest.raises(ConversionError, match="model.add_qkv_bias with model.qk_layernorm: no HF family here"):
        llama_config_for(both, vocab_size=96)
