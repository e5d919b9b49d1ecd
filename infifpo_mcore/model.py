"""The pivot: a Megatron-Core ``GPTModel`` built for this rank's pipeline stage(s), wrapped in Megatron DDP.

Transformer Engine's layer spec (fused kernels, FP8) on GPUs where TE is installed; Megatron's local spec otherwise
(CPU, or a GPU image without TE — FP8 then unavailable, said once at start); Gemma's layer from Megatron's local
modules everywhere (``layer_spec.py``). RoPE tables other than the plain one come from ``rope.py``.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from infifpo_mcore import layer_spec
from infifpo_mcore.config import ModelConfig, RopeScaling, needs_own_layer
from infifpo_mcore.rope import inverse_frequencies

logger = logging.getLogger(__name__)



def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GeLU with the tanh approximation (HF's gelu_pytorch_tanh)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


_ACTIVATIONS = {
    # name -> (activation, gated linear unit)
    "swiglu": (torch.nn.functional.silu, True),
    "gelu": (torch.nn.functional.gelu, False),
    "geglu_tanh": (gelu_tanh, True),
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}  # fp8: bf16 weights, FP8 GEMMs


def params_dtype(precision: str) -> torch.dtype:
    """The dtype of the pivot's weights for ``train.precision`` (resolved): what the model and optimizer use."""
    return _DTYPES[precision]


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def build_transformer_config(*, model: ModelConfig, tensor: int, pipeline: int, precision: str,
                             recompute: str = "none", virtual_pipeline: int | None = None) -> TransformerConfig:
    """``recompute``: 'none', 'selective' (Megatron's core-attention recomputation) or 'full' (every layer,
    uniformly, one layer per checkpoint). ``virtual_pipeline``: model chunks per pipeline rank, or None."""
    activation, gated = _ACTIVATIONS[model.activation]
    dtype = params_dtype(precision)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        layernorm_epsilon=model.norm_epsilon,
        layernorm_zero_centered_gamma=model.zero_centered_norms,
        kv_channels=model.kv_channels,
        qk_layernorm=model.qk_layernorm,
        softmax_scale=model.softmax_scale,
        # HF's window counts the query itself; Megatron's (left, right) counts the tokens before it
        window_size=None if model.sliding_window is None else (model.sliding_window - 1, 0),
        window_attn_skip_freq=_window_layers(model),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        # The interleaved schedule's p2p as Megatron-LM sets it: unbatched, each direction in its own group. Batched
        # (Megatron's default), at PP 2 an activation and a gradient travel to the same peer in one batch, posted in
        # opposite orders by sender and receiver, and arrive swapped (docs/repro/vpp_batched_p2p.py).
        overlap_p2p_comm=virtual_pipeline is not None,
        batch_p2p_comm=virtual_pipeline is None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # TE layers run their GEMMs in FP8 (E4M3 forward, E5M2 gradients) under the context Megatron's
        # TransformerBlock enters itself; delayed scaling, Megatron's default recipe.
        fp8="hybrid" if precision == "fp8" else None,
        # CPU init draws the full matrix then slices it, so a fresh model is identical at any TP size.
        use_cpu_initialization=not on_gpu,
        # Fused kernels exist only on GPU: the jit-scripted bias fusions on any (Megatron fuses silu and erf-gelu
        # only); the softmax and persistent-norm kernels come with TE (without it, Megatron's torch norm refuses
        # persist_layer_norm and the fused softmax imports a CUDA extension that is not there), and its fused causal
        # softmax ignores a sliding window.
        bias_activation_fusion=on_gpu and gated and activation is torch.nn.functional.silu,
        masked_softmax_fusion=transformer_engine_available() and model.sliding_window is None,
        persist_layer_norm=transformer_engine_available(),
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=None if recompute == "none" else str(recompute),
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        # The training loss_func returns (sum over its pairs, pair count, metrics): the schedule and finalize_model_grads
        # scale gradients by 1 / (pairs in the global batch) whatever each micro-batch holds (train_step.py)
        calculate_per_token_loss=True,
    )


def _window_layers(model: ModelConfig) -> list[int] | None:
    """Megatron's window_attn_skip_freq: 1 per sliding-window layer, 0 per full-attention one; None: all windowed."""
    if model.window_layers is None or all(model.window_layers):
        return None
    return [int(windowed) for windowed in model.window_layers]


def transformer_engine_attention(model: ModelConfig) -> bool:
    """Whether the pivot's layers are Transformer Engine's (packed micro-batches then take Megatron's THD path)
    rather than the local spec's (``attention.py``)."""
    return not needs_own_layer(model) and transformer_engine_available()


def _layer_spec(*, model: ModelConfig, config: TransformerConfig, vp_stage: int | None):
    if needs_own_layer(model):
        return layer_spec.own_block_spec(model=model, config=config, vp_stage=vp_stage)
    if torch.cuda.is_available() and not transformer_engine_available():
        logger.warning("Transformer Engine is not installed: local layer spec, no FP8 (install TE for fused/FP8 layers).")
    return layer_spec.megatron_spec(model=model, config=config, transformer_engine=transformer_engine_attention(model))


def _scale_embedding_output(module, args, output: torch.Tensor) -> torch.Tensor:
    """x sqrt(hidden_size), the factor rounded to fp32 then to the activations' dtype, as Gemma rounds it."""
    scale = torch.tensor(module.config.hidden_size ** 0.5, dtype=torch.float32)
    return output * scale.to(device=output.device, dtype=output.dtype)


class ResponseOnlyLogits:
    """Runs the last stage's output layer only at the positions the loss reads (the response tokens).

    A preference row's response is a few dozen of the sequence's tokens, yet the vocabulary projection is the largest
    matmul of a small model: projecting every position wastes most of it and materialises ``[S, B, V/TP]`` logits.
    A forward pre-hook on ``output_layer`` keeps the hidden states at ``positions`` (``[S, B]`` bool, set before each
    forward), so GPTModel returns ``[1, n, V/TP]`` logits for those n positions, in ``[S, B]`` row-major order.
    Incompatible with sequence parallelism (the sequence is sharded before the output layer), which we keep off.
    """

    def __init__(self, gpt: GPTModel):
        self.positions: torch.Tensor | None = None
        gpt.output_layer.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.positions is None:
            return None
        hidden_states = args[0]  # [S, B, H]
        return (hidden_states[self.positions].unsqueeze(1), *args[1:])


def uses_thd_attention(model: DistributedDataParallel) -> bool:
    """Whether this chunk's attention takes packed micro-batches in Megatron's THD layout (Transformer Engine)."""
    return model.module.thd_attention


def set_response_positions(model: DistributedDataParallel, positions: torch.Tensor) -> None:
    """Selects the output positions of the next forward of this chunk (a no-op off the last stage)."""
    selector = getattr(model.module, "response_logits", None)
    if selector is not None:
        selector.positions = positions


def build_gpt(*, model: ModelConfig, config: TransformerConfig, vocab_size: int, device: torch.device,
              vp_stage: int | None = None) -> GPTModel:
    """This rank's pipeline stage of the pivot (its model chunk ``vp_stage`` under a virtual pipeline), bare: what
    the checkpoint tools, which never train, build (DDP's gradient buffers would double their memory)."""
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(model=model, config=config, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    ).to(device)
    if model.rope_scaling != RopeScaling.none:  # Megatron's own llama3 scaling has its constants fixed (rope.py)
        gpt.rotary_pos_emb.inv_freq = inverse_frequencies(model).to(gpt.rotary_pos_emb.inv_freq.device)
    if model.scale_embeddings and gpt.pre_process:
        gpt.embedding.register_forward_hook(_scale_embedding_output)
    if config.bf16:
        # Every weight in bf16, as Megatron's Float16Module casts them: the local spec creates its torch norms in fp32
        # (TE's are created in params_dtype), which the bf16 optimizer would keep apart from the bf16 ones. (RoPE's
        # inv_freq is no buffer: it stays fp32.)
        gpt = gpt.bfloat16()
    if gpt.post_process:
        gpt.response_logits = ResponseOnlyLogits(gpt)
    gpt.thd_attention = transformer_engine_attention(model)  # how packed micro-batches reach attention (train_step)
    return gpt


def build_pivot(
    *, model: ModelConfig, config: TransformerConfig, vocab_size: int, device: torch.device,
    overlap_grad_reduce: bool = False, bucket_size: int | None = None, distributed_optimizer: bool = False,
    overlap_param_gather: bool = False,
) -> list[DistributedDataParallel]:
    """This rank's model chunks of the pivot, each DDP-wrapped: its pipeline stage, or under a virtual pipeline
    (``config.virtual_pipeline_model_parallel_size``) one chunk per virtual stage, as Megatron's optimizer and
    interleaved schedule expect them.

    ``overlap_grad_reduce``: each gradient bucket is all-reduced as soon as the last micro-batch's backward has
    filled it; the earlier micro-batches run under ``config.no_sync_func`` (set here), which the schedule uses
    (with several chunks, also ``config.grad_sync_func``: the schedule starts each chunk's reduce after its last
    backward). ``distributed_optimizer``: gradients are reduce-scattered instead (each data-parallel rank updates its
    shard of the weights), and the weights all-gathered after the step: at once, or with ``overlap_param_gather``
    bucket by bucket in the next forward pass (``gather_weights`` completes it before a save)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce, bucket_size=bucket_size,
        use_distributed_optimizer=distributed_optimizer, overlap_param_gather=overlap_param_gather,
    )
    stages = config.virtual_pipeline_model_parallel_size
    chunks = [
        # As Megatron-LM: only the first chunk is bucketed (the later chunks' reduces start in the schedule)
        DistributedDataParallel(config=config, ddp_config=ddp_config, disable_bucketing=index > 0,
                                module=build_gpt(model=model, config=config, vocab_size=vocab_size, device=device,
                                                 vp_stage=index if stages else None))
        for index in range(stages or 1)
    ]
    if overlap_grad_reduce:
        if len(chunks) == 1:
            config.no_sync_func = chunks[0].no_sync
        else:
            config.no_sync_func = [chunk.no_sync for chunk in chunks]
            config.grad_sync_func = [chunk.start_grad_sync for chunk in chunks]
    return chunks


def gather_weights(model_chunks: list[DistributedDataParallel]) -> None:
    """Completes the distributed optimizer's weight all-gather now, where ``overlap_param_gather`` left it to the next
    forward pass (whose hooks gather each bucket on first use): before a checkpoint save, which would otherwise write
    other ranks' shares of the weights as they were before the last step."""
    for chunk in model_chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)
