import dataclasses

import pytest

from infifpo_mcore.config import ModelConfig
from infifpo_mcore.memory import (GIB, HEADROOM, activation_bytes, choose_micro_batch_size, estimate_memory_per_rank,
                                  layer_activation_bytes, layer_parameters, padded_vocab, stage_parameters)
from tests.distributed import run_distributed

# h 64, 4 heads of 16, 2 KV groups, SwiGLU ffn 96, 4 layers, vocab 300 -> padded to 384 (128 x TP 1 or 3)
SMALL = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                    seq_length=32, tie_embeddings=False)
VOCAB = 300
QWEN3_LIKE = dataclasses.replace(SMALL, kv_channels=32, qk_layernorm=True)  # heads of 32 != 64 / 4, q/k norms
GEMMA3_LIKE = dataclasses.replace(
    QWEN3_LIKE, activation="geglu_tanh", tie_embeddings=True, zero_centered_norms=True, post_norms=True,
    scale_embeddings=True, sliding_window=8, window_layers=[True, False, True, False], local_rotary_base=1e4)
SHAPES = {
    "untied RMSNorm SwiGLU": SMALL,
    "tied LayerNorm GeLU": dataclasses.replace(SMALL, tie_embeddings=True, normalization="LayerNorm",
                                               activation="gelu"),
    "Qwen3-like": QWEN3_LIKE,
    "Gemma-3-like": GEMMA3_LIKE,
}


def test_parameter_hand_count():
    # qkv 64 x (4 + 2 x 2) x 16 = 8192, proj 64 x 64 = 4096, fc1 64 x 96 x 2 = 12288, fc2 96 x 64 = 6144,
    # two RMSNorms 2 x 64
    assert layer_parameters(model=SMALL, tensor=1) == 8192 + 4096 + 12288 + 6144 + 128
    embedding = 384 * 64
    total = 4 * 30848 + embedding + 64 + embedding  # layers, word embedding, final norm, untied output layer
    assert stage_parameters(model=SMALL, vocab_size=VOCAB, tensor=1, pipeline=1, stage=0) == total
    tied = dataclasses.replace(SMALL, tie_embeddings=True)
    assert stage_parameters(model=tied, vocab_size=VOCAB, tensor=1, pipeline=1, stage=0) == total - embedding


def test_parameter_hand_count_with_a_head_size_of_its_own_and_gemma_norms():
    # qkv 64 x (4 + 2 x 2) x 32 = 16384, proj 4 x 32 x 64 = 8192, fc1 and fc2 as SMALL (both gated), two q/k norms 32
    assert layer_parameters(model=QWEN3_LIKE, tensor=1) == 16384 + 8192 + 12288 + 6144 + 128 + 64
    assert layer_parameters(model=GEMMA3_LIKE, tensor=1) == 16384 + 8192 + 12288 + 6144 + 4 * 64 + 64  # 4 norms


def test_tensor_and_pipeline_division():
    # TP 2: linear layers halve, norms stay whole; the vocabulary pads to a multiple of 128 x 2 = 256 -> 512
    assert layer_parameters(model=SMALL, tensor=2) == (8192 + 4096 + 12288 + 6144) // 2 + 128
    first, last = (stage_parameters(model=SMALL, vocab_size=VOCAB, tensor=2, pipeline=2, stage=stage)
                   for stage in (0, 1))
    layers = 2 * layer_parameters(model=SMALL, tensor=2)
    assert first == layers + 512 * 64 // 2
    assert last == layers + 64 + 512 * 64 // 2
    # tied embeddings: the last stage still holds its copy of the output layer when PP > 1
    tied = dataclasses.replace(SMALL, tie_embeddings=True)
    assert stage_parameters(model=tied, vocab_size=VOCAB, tensor=2, pipeline=2, stage=1) == last


def _gpt_numels(ctx, *, shapes, vocab_size, expected):
    """On every rank: the parameters of its GPTModel stage == the estimate's count for that stage."""
    from megatron.core import parallel_state

    from infifpo_mcore.model import build_pivot, build_transformer_config

    tensor = parallel_state.get_tensor_model_parallel_world_size()
    pipeline = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    for name, model in shapes.items():
        config = build_transformer_config(model=model, tensor=tensor, pipeline=pipeline, precision="fp32")
        padded = padded_vocab(model=model, vocab_size=vocab_size, tensor=tensor)
        (ddp,) = build_pivot(model=model, config=config, vocab_size=padded, device=ctx.device)
        numel = sum(parameter.numel() for parameter in ddp.module.parameters())
        assert numel == expected[name][stage], f"{name}, stage {stage}: GPTModel has {numel}"


def _expected(tensor: int, pipeline: int) -> dict[str, list[int]]:
    return {name: [stage_parameters(model=model, vocab_size=VOCAB, tensor=tensor, pipeline=pipeline, stage=stage)
                   for stage in range(pipeline)] for name, model in SHAPES.items()}


def test_parameters_equal_a_real_megatron_gpt_model():
    run_distributed(_gpt_numels, world_size=1, shapes=SHAPES, vocab_size=VOCAB, expected=_expected(1, 1))


@pytest.mark.distributed
def test_parameters_per_rank_equal_a_real_megatron_gpt_model_at_tp2_pp2():
    run_distributed(_gpt_numels, world_size=4, tensor=2, pipeline=2, shapes=SHAPES, vocab_size=VOCAB,
                    expected=_expected(2, 2))


def _estimate(**changes):
    arguments = dict(model=SMALL, tensor=1, pipeline=1, data=1, micro_batch_size=2, seq_length=32,
                     precision="bf16", distributed_optimizer=False, vocab_size=VOCAB)
    return estimate_memory_per_rank(**(arguments | changes))


def test_weights_gradients_and_optimizer_states_per_parameter():
    bf16 = _estimate()
    parameters = bf16.parameters
    assert (bf16.weight_bytes, bf16.gradient_bytes, bf16.optimizer_bytes) == (2 * parameters, 4 * parameters,
                                                                               12 * parameters)
    fp32 = _estimate(precision="fp32")
    assert (fp32.weight_bytes, fp32.gradient_bytes, fp32.optimizer_bytes) == (4 * parameters, 4 * parameters,
                                                                               8 * parameters)
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        _estimate(precision="auto")


def test_the_distributed_optimizer_shards_only_the_optimizer_states_over_data_parallel():
    replicated, sharded = _estimate(data=4), _estimate(data=4, distributed_optimizer=True)
    assert sharded.optimizer_bytes == -(-replicated.optimizer_bytes // 4)
    assert (sharded.weight_bytes, sharded.gradient_bytes, sharded.activation_bytes) == (
        replicated.weight_bytes, replicated.gradient_bytes, replicated.activation_bytes)
    assert _estimate(data=1, distributed_optimizer=True).optimizer_bytes == replicated.optimizer_bytes


def test_activation_hand_count():
    # b = 2 x micro-batch 2 = 4 sequences (chosen + rejected) of s 32: 128 tokens, bf16 (2 bytes)
    # per layer: replicated 4 x 2 x 128 x 64 = 65536; split 2 x 128 x (qkv 128 + proj 64 + fc1 192 + fc2 96)
    per_layer = 65536 + 2 * 128 * (128 + 64 + 192 + 96)
    logits = 2 * 2 * 128 * 64 + 4 * 128 * 384  # final-norm and output-layer inputs, fp32 logits
    assert activation_bytes(model=SMALL, tensor=1, pipeline=1, stage=0, micro_batch_size=2, seq_length=32,
                            precision="bf16", vocab_size=VOCAB) == 4 * per_layer + logits
    # unfused attention keeps the softmax output a s^2 b
    unfused = activation_bytes(model=SMALL, tensor=1, pipeline=1, stage=0, micro_batch_size=2, seq_length=32,
                               precision="bf16", vocab_size=VOCAB, fused_attention=False)
    assert unfused == 4 * (per_layer + 2 * 4 * 32 * 32 * 4) + logits
    # WRPO: three responses per row, b = 6 sequences; every term is linear in b
    wrpo = activation_bytes(model=SMALL, tensor=1, pipeline=1, stage=0, micro_batch_size=2, seq_length=32,
                            precision="bf16", vocab_size=VOCAB, responses_per_row=3)
    assert 2 * wrpo == 3 * (4 * per_layer + logits)


def test_korthikanti_formula_for_a_gpt3_shaped_layer():
    # One layer (stage 0 of 2) with MHA, F = 4h, GeLU, unfused attention is Korthikanti et al.'s
    # s b h (10 + 24/t + 5 a s / (h t)) minus their dropout terms (2 s b h of masks; a s^2 b / t mask and
    # 2 a s^2 b / t output of the attention dropout): the model trains with dropout 0. fp16 and bf16 sizes agree.
    gpt3 = ModelConfig(num_layers=2, hidden_size=1024, num_attention_heads=16, num_query_groups=16,
                       ffn_hidden_size=4096, activation="gelu")
    s, b, h, a, t = 512, 2, 1024, 16, 2
    paper = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    dropout = 2 * s * b * h + 3 * a * s * s * b / t
    ours = activation_bytes(model=gpt3, tensor=t, pipeline=2, stage=0, micro_batch_size=b // 2, seq_length=s,
                            precision="bf16", vocab_size=1024, fused_attention=False)
    assert ours == paper - dropout


def test_pipeline_stage_zero_keeps_pipeline_micro_batches_in_flight():
    model = dataclasses.replace(SMALL, num_layers=8)
    estimate = _estimate(model=model, pipeline=4)
    assert estimate.stage == 0 and estimate.microbatches_in_flight == 4
    one_stage = activation_bytes(model=model, tensor=1, pipeline=4, stage=0, micro_batch_size=2, seq_length=32,
                                 precision="bf16", vocab_size=VOCAB)
    assert estimate.activation_bytes == 4 * one_stage
    assert estimate.total_bytes == (estimate.weight_bytes + estimate.gradient_bytes + estimate.optimizer_bytes
                                    + estimate.activation_bytes)
    # twice the layers per stage at half the pipeline: stage 0 holds the same activations (L/p x p)
    assert _estimate(model=model, pipeline=2).activation_bytes == estimate.activation_bytes


def test_format_is_a_table_in_gib():
    text = _estimate(data=4, distributed_optimizer=True).format()
    lines = text.splitlines()
    assert lines[0].startswith("estimated memory per rank, pipeline stage 0 (TP 1 x PP 1 x DP 4, bf16)")
    assert [line.split()[0] for line in lines[1:]] == ["weights", "gradients", "optimizer", "activations", "total"]
    assert all(line.split()[2] == "GiB" for line in lines[1:])
    assert "sharded over DP 4" in text
    assert GIB == 2**30


def test_padded_vocab_is_divisible_per_tensor_shard():
    model = ModelConfig(make_vocab_size_divisible_by=128)
    assert padded_vocab(model=model, vocab_size=32000, tensor=2) == 32000
    assert padded_vocab(model=model, vocab_size=32001, tensor=2) == 32256
    assert padded_vocab(model=model, vocab_size=100, tensor=1) == 128


def _saved_activation_bytes(ctx, *, recompute: str, num_layers: int) -> int:
    """Bytes of the tensors autograd saves in one forward of a real GPTModel (parameters left out), one micro-batch
    of 2 pairs (4 sequences of 32 tokens), fp32."""
    import torch

    from infifpo_mcore.model import build_pivot, build_transformer_config, set_response_positions

    model = dataclasses.replace(SMALL, num_layers=num_layers)
    config = build_transformer_config(model=model, tensor=1, pipeline=1, precision="fp32", recompute=recompute)
    (ddp,) = build_pivot(model=model, config=config, vocab_size=384, device=ctx.device)
    set_response_positions(ddp, None)
    parameters = {parameter.untyped_storage().data_ptr() for parameter in ddp.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = ddp(tokens, torch.arange(32).expand(4, 32), None)
    logits.sum().backward()  # the recomputation runs (and works) on CPU
    return sum(saved.values())


def _per_layer_saved_bytes(ctx, *, results):
    for recompute in ("none", "selective", "full"):
        four, two = (_saved_activation_bytes(ctx, recompute=recompute, num_layers=layers) for layers in (4, 2))
        results[recompute] = (four - two) // 2


def test_full_recomputation_keeps_exactly_each_layer_input_in_a_real_megatron_gpt_model():
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Manager().dict()
    run_distributed(_per_layer_saved_bytes, world_size=1, results=results)
    estimate = {recompute: layer_activation_bytes(model=SMALL, tensor=1, micro_batch_size=2, seq_length=32,
                                                  precision="fp32", fused_attention=False, recompute=recompute)
                for recompute in ("none", "selective", "full")}
    assert results["full"] == estimate["full"] == 4 * 128 * 64  # fp32 x s b tokens x h
    assert results["full"] < results["selective"] < results["none"]
    # the local spec keeps more than the fused-layer count (GQA-expanded K and V, SwiGLU intermediates)
    assert estimate["none"] < results["none"] < 1.6 * estimate["none"]


def test_full_recomputation_counts_one_recomputed_layer_beside_the_micro_batches_in_flight():
    model = dataclasses.replace(SMALL, num_layers=8)
    none, full = _estimate(model=model, pipeline=2), _estimate(model=model, pipeline=2, recompute="full")
    layer = layer_activation_bytes(model=model, tensor=1, micro_batch_size=2, seq_length=32, precision="bf16")
    assert full.recomputed_layer_bytes == layer and none.recomputed_layer_bytes == 0
    inputs = 4 * 2 * 128 * 64  # 4 layers of stage 0, bf16, s b = 128 tokens, h 64
    assert activation_bytes(model=model, tensor=1, pipeline=2, stage=0, micro_batch_size=2, seq_length=32,
                            precision="bf16", vocab_size=VOCAB, recompute="full") == inputs
    assert full.activation_bytes == full.activation_bytes_per_microbatch * full.microbatches_in_flight + layer
    assert full.activation_bytes < none.activation_bytes
    assert "of the layer recomputed" in full.format()


def _choose(*, capacity_bytes: int, rows_per_rank: int = 12, pipeline: int = 1):
    return choose_micro_batch_size(estimate=lambda pairs: _estimate(micro_batch_size=pairs, pipeline=pipeline),
                                   rows_per_rank=rows_per_rank, pipeline=pipeline, capacity_bytes=capacity_bytes)


def test_auto_micro_batch_is_the_largest_divisor_whose_estimate_fits_the_device():
    sizes = {pairs: _estimate(micro_batch_size=pairs).total_bytes for pairs in (1, 2, 3, 4, 6, 12)}
    # room for 4 pairs but not 6: 4 (a divisor of the 12 rows each rank takes per step)
    capacity = int(sizes[4] / (1 - HEADROOM)) + 1
    assert sizes[6] > capacity * (1 - HEADROOM)
    pairs, estimate, fits = _choose(capacity_bytes=capacity)
    assert (pairs, fits) == (4, True) and estimate.total_bytes == sizes[4]
    assert _choose(capacity_bytes=10 * sizes[12])[:1] == (12,)
    assert _choose(capacity_bytes=sizes[1] // 2)[0::2] == (1, False)  # nothing fits: 1, flagged


def test_auto_micro_batch_keeps_two_micro_batches_per_pipeline_stage_where_it_can():
    plenty = 100 * _estimate(micro_batch_size=12, pipeline=2).total_bytes
    assert _choose(capacity_bytes=plenty, pipeline=2)[0] == 3  # 12 / 3 = 4 micro-batches = 2 x PP 2
    assert _choose(capacity_bytes=plenty, rows_per_rank=2, pipeline=2)[0] == 2  # 2 rows: no way to fill, the largest


def test_auto_micro_batch_under_a_virtual_pipeline_makes_whole_groups_of_pp_micro_batches():
    """The interleaved schedule runs micro-batches in groups of PP: 4 rows at PP 4 are one micro-batch of 4 where
    nothing fills the pipeline, but 4 of 1 under a virtual pipeline (micro_batch_multiple = PP)."""
    plenty = 100 * _estimate(micro_batch_size=4, pipeline=4).total_bytes
    assert _choose(capacity_bytes=plenty, rows_per_rank=4, pipeline=4)[0] == 4
    pairs, _, fits = choose_micro_batch_size(
        estimate=lambda size: _estimate(micro_batch_size=size, pipeline=4), rows_per_rank=4, pipeline=4,
        capacity_bytes=plenty, micro_batch_multiple=4)
    assert (pairs, fits) == (1, True)


def test_a_packed_micro_batch_counts_its_token_budget_and_keeps_no_attention_scores():
    """data.packing: one row of the budget; by default the unpacked micro-batch's tokens, so the estimate is the
    unpacked one less the local spec's s x s scores (packed attention runs per document, SDPA or TE's THD)."""
    budget = 2 * 2 * 32  # micro_batch_size 2 x chosen/rejected x seq_length 32
    packed = _estimate(packed_tokens=budget, fused_attention=False)
    assert packed.activation_bytes == _estimate(fused_attention=True).activation_bytes
    assert packed.activation_bytes < _estimate(fused_attention=False).activation_bytes
    assert _estimate(packed_tokens=2 * budget).activation_bytes > packed.activation_bytes


def test_auto_micro_batch_counts_the_packed_micro_batches_a_budget_gives_for_the_pipeline():
    """Packed pairs taking half their unpacked tokens: 12 rows fill 4 micro-batches (2 x PP 2) only with a budget
    of 1 unpacked pair (6 micro-batches; 2 would give 3), not 3 as when unpacked."""
    plenty = 100 * _estimate(micro_batch_size=12, pipeline=2).total_bytes
    per_pair = 2 * 32  # unpacked tokens of a pair
    pairs, _, fits = choose_micro_batch_size(
        estimate=lambda size: _estimate(micro_batch_size=size, pipeline=2, packed_tokens=size * per_pair),
        rows_per_rank=12, pipeline=2, capacity_bytes=plenty, packed=(per_pair / 2, lambda size: size * per_pair))
    assert (pairs, fits) == (1, True)
    pairs, _, _ = choose_micro_batch_size(
        estimate=lambda size: _estimate(micro_batch_size=size, pipeline=2, packed_tokens=size * per_pair),
        rows_per_rank=12, pipeline=2, capacity_bytes=plenty, packed=(per_pair, lambda size: size * per_pair))
    assert pairs == 3  # pairs as long as unpacked: as unpacked
