"""GPU memory per rank of a pivot training job, estimated from the config alone (no process groups, no torch).

    estimate = estimate_memory_per_rank(model=cfg.model, tensor=2, pipeline=4, data=8, micro_batch_size=1,
                                        seq_length=4096, precision="bf16", distributed_optimizer=True,
                                        vocab_size=100352)
    print(estimate.format())

Notation: L layers, h hidden, a heads, g query groups (KV heads), d the head size (``kv_channels``, by default h / a;
Mistral-Nemo, Qwen3 and Gemma 3 set their own), F ffn hidden, V vocabulary padded as the trainer pads it (to
``make_vocab_size_divisible_by`` x t), t tensor-, p pipeline-, D data-parallel size.

**Parameters** of one Megatron-Core ``GPTModel`` layer (no biases: ``add_bias_linear=False``)::

    qkv  h (a + 2g) d      proj  a d h      fc1  h F (x2 gated, SwiGLU / GeGLU: gate and up)      fc2  F h
    two norms  h each (RMSNorm: weight; LayerNorm: weight + bias = 2h); four with post_norms (Gemma 3)
    q / k norms  d each (qk_layernorm: Qwen3, Gemma 3)

The linear layers are split t ways (column / row parallel), the norms are replicated. Stage s of p holds L / p
layers; the first stage also holds the word embedding (V h / t, RoPE has no parameters), the last the final norm and
the output layer (V h / t; with tied embeddings Megatron still keeps a copy there when p > 1, none when p = 1).

**Weights, gradients and optimizer states**, bytes per parameter (Megatron mixed precision: bf16 weights, gradients
accumulated and reduced in fp32, Adam on an fp32 master copy: Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models" (arXiv 1910.02054) section 3.1, whose optimizer-state
sharding Megatron's distributed optimizer implements; the bytes are the table of Megatron-LM's
``docs/api-guide/dist_optimizer.md``)::

    precision   weights   gradients   optimizer (master + Adam m + v)   distributed optimizer (sharded over D)
    bf16        2         4           4 + 4 + 4 = 12                   6 + 12 / D
    fp32        4         4           0 + 4 + 4 =  8                   8 +  8 / D

**Activations** of one micro-batch, per layer and rank, without recomputation and without sequence parallelism (the
trainer keeps it off: the response-only output projection needs the whole sequence), after Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198), section 4, whose GPT-3 count is
``s b h (34 + 5 a s / h)`` bytes in fp16, or ``s b h (10 + 24 / t + 5 a s / (h t))`` with t-way tensor parallelism.
Their terms, re-derived for this pivot with e bytes per activation element (2 in bf16, 4 in fp32)::

    replicated over t:  attention-norm input, QKV input, MLP-norm input, fc1 input      4 e s b h
    split over t:       Q, K, V                                                       e s b (a + 2g) d / t
                        attention output (proj input)                                 e s b a d / t
                        fc1 output (activation input), F or 2F wide when gated        e s b F (1 or 2) / t
                        activation output (fc2 input)                                 e s b F / t
                        attention scores: fused/flash attention keeps none;
                        unfused (Megatron's local spec) keeps the softmax output      e a s^2 b / t

**Recomputation** (``train.recompute``): ``selective`` recomputes the attention core, so the unfused softmax output is
not kept (fused attention keeps none anyway); ``full`` keeps only each layer's input, ``e s b h``, and recomputes the
rest layer by layer in the backward pass, which holds one layer's activations of one micro-batch at a time (counted
once, beside the in-flight micro-batches). Checked against a real Megatron ``GPTModel`` (``tests/test_memory.py``,
saved-tensor hooks): with ``full`` it keeps exactly ``e s b h`` per layer. Without recomputation Megatron's local
spec (CPU, GPUs without TE) keeps more than the count below, about 1.5x per layer at small shapes: it expands K and V
to all heads for GQA and keeps SwiGLU's intermediates; the count is that of fused (TE) layers.

Gemma's layer (``post_norms``) also keeps its two post-norms' inputs (``2 e s b h``, replicated) and, like Qwen3, its
query / key norms' inputs (``e s b (a + g) d / t``); it runs Megatron's local attention on every device, so its
softmax output counts as unfused.

The model trains with dropout 0, so the paper's dropout masks (``2 s b h + a s^2 b``) and the dropout output
(``2 a s^2 b``) do not exist. With MHA, F = 4h, GeLU, unfused attention and the dropout terms added back this is the
paper's formula exactly. The last stage adds the final norm input and the output-layer input (``2 e s b h``) and the
fp32 logits the cross-entropy keeps (``4 s b V / t``; conservative: the trainer projects response positions only).

**A preference pair doubles the sequences**: chosen and rejected of a row share a micro-batch, so b = 2 x
micro_batch_size sequences of ``seq_length`` tokens (3 x with WRPO's second chosen response: ``responses_per_row``).

**Packed micro-batches** (``data.packing``) are one row of ``packed_tokens`` (the token budget): s b = the budget
in every term above. Their attention (torch's scaled_dot_product_attention over the documents, ``attention.py``, or
Transformer Engine's THD kernels) keeps no score matrix, so the unfused ``a s^2 b`` term does not apply. The default
budget, micro_batch_size x responses x seq_length, is the unpacked micro-batch's token count: the same memory, less
the score matrices of the local spec.

**Pipeline schedule**: with 1F1B, stage s (0-based) holds the activations of ``p - s`` micro-batches at its peak,
so stage 0 keeps p micro-batches of its L / p layers in flight (Narayanan et al. 2021, "Efficient Large-Scale
Language Model Training on GPU Clusters Using Megatron-LM", section 2.2.1). This assumes at least p micro-batches
per step (fewer only lowers the peak). The estimate is per stage; the heaviest one is reported.

Not counted: the CUDA context and NCCL buffers (about 1-3 GiB), allocator fragmentation, Transformer Engine
workspaces and FP8 scaling state, the temporary all-gather / reduce-scatter buffers. Leave some 10-20% headroom.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from infifpo_mcore.config import ModelConfig, head_dim, needs_own_layer

GIB = 1 << 30
_ELEMENT_BYTES = {"bf16": 2, "fp32": 4}
# (weights, gradients, optimizer states) in bytes per parameter; see the module docstring
STATE_BYTES = {"bf16": (2, 4, 12), "fp32": (4, 4, 8)}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank of the heaviest pipeline stage; ``format()`` renders it as a table in GiB."""
    stage: int  # the heaviest pipeline stage (0-based)
    tensor: int
    pipeline: int
    data: int
    precision: str
    distributed_optimizer: bool
    parameters: int  # parameters held by one rank of that stage
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes_per_microbatch: int
    microbatches_in_flight: int
    recomputed_layer_bytes: int = 0  # full recomputation: the one layer being recomputed in the backward pass

    @property
    def activation_bytes(self) -> int:
        return self.activation_bytes_per_microbatch * self.microbatches_in_flight + self.recomputed_layer_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def format(self) -> str:
        sharding = f"sharded over DP {self.data}" if self.distributed_optimizer else "not sharded"
        rows = [
            ("weights", self.weight_bytes, f"{self.parameters / 1e9:.3f} B parameters, {self.precision}"),
            ("gradients", self.gradient_bytes, "fp32 gradient buffer"),
            ("optimizer", self.optimizer_bytes, f"Adam states ({sharding})"),
            ("activations", self.activation_bytes,
             f"{self.microbatches_in_flight} micro-batch(es) in flight x "
             f"{self.activation_bytes_per_microbatch / GIB:.2f} GiB"
             + (f" + {self.recomputed_layer_bytes / GIB:.2f} GiB of the layer recomputed"
                if self.recomputed_layer_bytes else "")),
            ("total", self.total_bytes, "before CUDA context, NCCL buffers and fragmentation"),
        ]
        lines = [f"estimated memory per rank, pipeline stage {self.stage} (TP {self.tensor} x PP {self.pipeline} x "
                 f"DP {self.data}, {self.precision})"]
        lines += [f"  {name:<12}{size / GIB:>9.2f} GiB   {note}" for name, size, note in rows]
        return "\n".join(lines)


def padded_vocab(*, model: ModelConfig, vocab_size: int, tensor: int) -> int:
    """Megatron-LM's convention, used by the trainer: pad so every TP shard of the embedding has the same, aligned
    size."""
    multiple = model.make_vocab_size_divisible_by * tensor
    return -(-vocab_size // multiple) * multiple


def gated(model: ModelConfig) -> bool:
    """Whether the MLP's first matrix is [gate; up] (SwiGLU, GeGLU)."""
    return str(model.activation) in ("swiglu", "geglu_tanh")


def layer_parameters(*, model: ModelConfig, tensor: int) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank."""
    d = head_dim(model)
    qkv = model.hidden_size * (model.num_attention_heads + 2 * model.num_query_groups) * d
    proj = model.num_attention_heads * d * model.hidden_size
    gates = 2 if gated(model) else 1
    mlp = model.hidden_size * model.ffn_hidden_size * gates + model.ffn_hidden_size * model.hidden_size
    norms = (4 if model.post_norms else 2) * _norm_parameters(model)
    qk_norms = 2 * d if model.qk_layernorm else 0
    return (qkv + proj + mlp) // tensor + norms + qk_norms


def stage_parameters(*, model: ModelConfig, vocab_size: int, tensor: int, pipeline: int, stage: int) -> int:
    """Parameters one tensor-parallel rank of pipeline stage ``stage`` holds (vocab_size before padding)."""
    embedding = padded_vocab(model=model, vocab_size=vocab_size, tensor=tensor) * model.hidden_size // tensor
    count = model.num_layers // pipeline * layer_parameters(model=model, tensor=tensor)
    if stage == 0:
        count += embedding
    if stage == pipeline - 1:
        count += _norm_parameters(model)  # final norm
        if not model.tie_embeddings or pipeline > 1:
            count += embedding  # output layer (its own weight, or the tied copy Megatron keeps on the last stage)
    return count


def _tokens(*, micro_batch_size: int, seq_length: int, responses_per_row: int, packed_tokens: int | None) -> int:
    """s * b of one micro-batch: b = chosen + rejected (+ chosen_pivot) sequences per pair, or the packed budget."""
    return packed_tokens if packed_tokens is not None else responses_per_row * micro_batch_size * seq_length


def layer_activation_bytes(*, model: ModelConfig, tensor: int, micro_batch_size: int, seq_length: int,
                           precision: str, fused_attention: bool = True, responses_per_row: int = 2,
                           recompute: str = "none", packed_tokens: int | None = None) -> int:
    """Activations one transformer layer keeps for one micro-batch on one rank (module docstring formula)."""
    element = _ELEMENT_BYTES[counted_precision(precision)]
    tokens = _tokens(micro_batch_size=micro_batch_size, seq_length=seq_length, responses_per_row=responses_per_row,
                     packed_tokens=packed_tokens)
    h, heads, groups = model.hidden_size, model.num_attention_heads, model.num_query_groups
    if recompute == "full":
        return element * tokens * h  # the layer's input only
    d = head_dim(model)
    gates = 2 if gated(model) else 1
    replicated = (6 if model.post_norms else 4) * element * tokens * h  # + the post-norms' inputs
    split = element * tokens * ((heads + 2 * groups) * d + heads * d + model.ffn_hidden_size * (gates + 1))
    if model.qk_layernorm:
        split += element * tokens * (heads + groups) * d  # the q / k norms' inputs
    if needs_own_layer(model):
        fused_attention = False  # Gemma's layer runs Megatron's local (unfused) attention everywhere
    if packed_tokens is not None:
        fused_attention = True  # packed rows: SDPA over the documents or TE's THD kernels, no scores kept
    if not fused_attention and recompute != "selective":
        split += element * heads * seq_length * tokens  # softmax output a s^2 b
    return replicated + split // tensor


def activation_bytes(*, model: ModelConfig, tensor: int, pipeline: int, stage: int, micro_batch_size: int,
                     seq_length: int, precision: str, vocab_size: int, fused_attention: bool = True,
                     responses_per_row: int = 2, recompute: str = "none", packed_tokens: int | None = None) -> int:
    """Activations one micro-batch leaves on one rank of ``stage`` for its backward (module docstring formula)."""
    element = _ELEMENT_BYTES[counted_precision(precision)]
    tokens = _tokens(micro_batch_size=micro_batch_size, seq_length=seq_length, responses_per_row=responses_per_row,
                     packed_tokens=packed_tokens)
    h = model.hidden_size
    per_layer = layer_activation_bytes(model=model, tensor=tensor, micro_batch_size=micro_batch_size,
                                       seq_length=seq_length, precision=precision, fused_attention=fused_attention,
                                       responses_per_row=responses_per_row, recompute=recompute,
                                       packed_tokens=packed_tokens)
    total = model.num_layers // pipeline * per_layer
    if stage == pipeline - 1:
        padded = padded_vocab(model=model, vocab_size=vocab_size, tensor=tensor)
        total += 2 * element * tokens * h + 4 * tokens * padded // tensor
    return total


def estimate_memory_per_rank(*, model: ModelConfig, tensor: int, pipeline: int, data: int, micro_batch_size: int,
                             seq_length: int, precision: str, distributed_optimizer: bool, vocab_size: int,
                             fused_attention: bool = True, responses_per_row: int = 2,
                             recompute: str = "none", packed_tokens: int | None = None) -> MemoryEstimate:
    """Memory of one rank of the heaviest pipeline stage (see the module docstring for every formula).

    ``precision``: 'bf16', 'fp32' or 'fp8' (counted as bf16; resolve 'auto' first). ``vocab_size``: the tokenizer's
    (or model.vocab_size), padded here as the trainer pads it. ``fused_attention``: Transformer Engine / flash attention (no s^2 scores
    kept); False for Megatron's local layer spec. ``responses_per_row``: sequences per row (3 for WRPO).
    ``recompute``: 'none', 'selective' or 'full' (``train.recompute``). ``packed_tokens``: the token budget of a
    packed micro-batch (``data.packing``), None when unpacked.
    """
    precision = counted_precision(precision)
    weight, gradient, optimizer = STATE_BYTES[precision]
    estimates = []
    for stage in range(pipeline):
        parameters = stage_parameters(model=model, vocab_size=vocab_size, tensor=tensor, pipeline=pipeline,
                                      stage=stage)
        optimizer_bytes = parameters * optimizer
        estimates.append(MemoryEstimate(
            stage=stage, tensor=tensor, pipeline=pipeline, data=data, precision=precision,
            distributed_optimizer=distributed_optimizer, parameters=parameters,
            weight_bytes=parameters * weight, gradient_bytes=parameters * gradient,
            optimizer_bytes=-(-optimizer_bytes // data) if distributed_optimizer else optimizer_bytes,
            activation_bytes_per_microbatch=activation_bytes(
                model=model, tensor=tensor, pipeline=pipeline, stage=stage, micro_batch_size=micro_batch_size,
                seq_length=seq_length, precision=precision, vocab_size=vocab_size, fused_attention=fused_attention,
                responses_per_row=responses_per_row, recompute=recompute, packed_tokens=packed_tokens),
            microbatches_in_flight=pipeline - stage,
            recomputed_layer_bytes=layer_activation_bytes(
                model=model, tensor=tensor, micro_batch_size=micro_batch_size, seq_length=seq_length,
                precision=precision, fused_attention=fused_attention, responses_per_row=responses_per_row,
                packed_tokens=packed_tokens) if recompute == "full" else 0,
        ))
    return max(estimates, key=lambda estimate: estimate.total_bytes)


def device_memory_bytes(device) -> int:
    """What one rank may use: its GPU's memory, or on a CPU the machine's RAM shared by the ranks on it."""
    import os

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


# Left free of the device's memory by the estimate: the CUDA context, NCCL buffers, fragmentation (module docstring)
HEADROOM = 0.15


def choose_micro_batch_size(*, estimate: Callable[[int], MemoryEstimate], rows_per_rank: int, pipeline: int,
                            capacity_bytes: int, packed: tuple[float, Callable[[int], int]] | None = None,
                            micro_batch_multiple: int = 1) -> tuple[int, MemoryEstimate, bool]:
    """``train.micro_batch_size: null``: (pairs per micro-batch, its estimate, whether it fits).

    The largest divisor of the step's ``rows_per_rank`` (global batch / DP) whose ``estimate`` stays within
    ``capacity_bytes`` less ``HEADROOM``: a larger micro-batch uses the GPU better. With pipeline parallelism it keeps
    at least 2 x ``pipeline`` micro-batches per step where one fits, since 1F1B idles (p - 1) / (m + p - 1) of the
    step. Nothing fits: 1, and False (the caller warns).

    ``packed``: (the mean tokens a pair takes packed, the token budget of a size) for packed micro-batches, whose
    estimate is that of the budget; a step then has about rows x mean / budget micro-batches, not rows / size.
    ``micro_batch_multiple`` (a virtual pipeline's PP): unpacked, only sizes giving a multiple of it micro-batches
    (packed, the trainer rounds the count up itself)."""
    budget = capacity_bytes * (1 - HEADROOM)
    divisors = [size for size in range(rows_per_rank, 0, -1)
                if rows_per_rank % size == 0 and (packed is not None or rows_per_rank // size % micro_batch_multiple == 0)]
    fitting = [(size, result) for size in divisors if (result := estimate(size)).total_bytes <= budget]
    if not fitting:
        return 1, estimate(1), False

    def micro_batches(size: int) -> float:
        if packed is None:
            return rows_per_rank // size
        mean_tokens, token_budget = packed
        return math.ceil(rows_per_rank * mean_tokens / token_budget(size))

    if pipeline > 1:
        filled = [(size, result) for size, result in fitting if micro_batches(size) >= 2 * pipeline]
        fitting = filled or fitting
    size, result = fitting[0]
    return size, result, True


def _norm_parameters(model: ModelConfig) -> int:
    return model.hidden_size * (1 if model.normalization == "RMSNorm" else 2)


def counted_precision(precision: str) -> str:
    """The precision whose bytes a run's memory and checkpoints take: 'bf16' or 'fp32' ('fp8' keeps bf16 weights)."""
    if str(precision) == "fp8":  # bf16 weights and activations; TE's transient FP8 copies are not counted
        return "bf16"
    if str(precision) not in _ELEMENT_BYTES:
        raise ValueError(f"precision must be one of {sorted(_ELEMENT_BYTES)} (resolve 'auto' first), "
                         f"got {precision!r}")
    return str(precision)
