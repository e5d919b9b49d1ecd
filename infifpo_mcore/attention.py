"""Attention over packed micro-batches (``packing``) in Megatron-Core's local layer spec: every device without
Transformer Engine (the CPU, GPUs without TE) and Gemma 3's layer everywhere.

A packed row ``[1, L]`` holds documents one after the other (``batch["documents"]``, cu_seqlens). Megatron's local
``DotProductAttention`` refuses packed sequences; ``PackedDotProductAttention`` runs torch's
``scaled_dot_product_attention`` on each document with the mask that isolates it:

    query i sees key j (both in one document)  iff  j <= i,  branch[j] in (0, branch[i]),
                                                      and, in sliding-window layers, position[i] - position[j] <= window

Unshared, every branch is 0 and this is the causal mask of each sequence. With a shared prompt (``packing``), a
response branch sees the shared prefix and itself, never the other responses. Positions are the tokens' own
(``position_ids``: restarting per sequence, continuing from the prompt in a branch), so windows mean what they mean
unpacked. ``PackedSelfAttention`` rotates queries and keys (RoPE) by those positions: Megatron's GPTModel builds
its table for positions 0..L-1, the layout's ``max_seqlen``. Unpacked micro-batches (no layout) run Megatron's own
code unchanged.

On Transformer Engine's spec the same micro-batch goes through Megatron's packed-sequence path instead: THD layout,
``PackedSeqParams(qkv_format="thd")`` with the documents as cu_seqlens; RoPE restarts per document there. That path
cannot express a shared prompt (branches), and it has not run here (no GPU with TE on the test machines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.utils import is_layer_window_attention
from torch import Tensor

from infifpo_mcore.data import PreferenceBatch


@dataclass
class PackedLayout(PackedSeqParams):
    """Megatron's packed-sequence parameters plus what the local attention needs: a ``qkv_format`` other than 'thd',
    so Megatron's SelfAttention keeps the ``[s, b=1, ...]`` layout and passes this object through to the core
    attention. ``positions [L]``: each token's position; ``bounds``: the document boundaries (cu_seqlens as ints);
    ``masks``: per document its ``[n, n]`` bool mask (True: may attend) or None where it is plain causal."""

    positions: Tensor | None = None
    bounds: list[int] = field(default_factory=list)
    masks: list[Tensor | None] = field(default_factory=list)


def packed_seq_params(batch: PreferenceBatch, *, thd: bool) -> PackedSeqParams:
    """The parameters a packed micro-batch travels with through the model: Megatron's THD ones for Transformer
    Engine's attention (``thd``), else a ``PackedLayout`` for ``PackedDotProductAttention``."""
    documents = batch["documents"]
    bounds = documents.tolist()
    longest = max(end - start for start, end in zip(bounds, bounds[1:]))
    if thd:
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=documents, cu_seqlens_kv=documents,
                               max_seqlen_q=longest, max_seqlen_kv=longest)
    length = batch["tokens"].shape[1]
    branches = batch["branches"][0]
    masks = []
    for start, end in zip(bounds, bounds[1:]):
        branch = branches[start:end]
        if not bool(branch.any()):
            masks.append(None)
            continue
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=branch.device).tril()
        masks.append(causal & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None])))
    return PackedLayout(qkv_format="sbhd", cu_seqlens_q=documents, cu_seqlens_kv=documents, max_seqlen_q=length,
                        max_seqlen_kv=length, positions=batch["position_ids"][0], bounds=bounds, masks=masks)


class PackedSelfAttention(SelfAttention):
    """Megatron's SelfAttention; with a ``PackedLayout``, RoPE at each token's own position (module docstring)."""

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        if isinstance(packed_seq_params, PackedLayout) and rotary_pos_emb is not None:
            rotary_pos_emb = rotary_pos_emb[packed_seq_params.positions]  # [L, 1, 1, D] of positions 0..L-1
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb,
                               packed_seq_params=packed_seq_params, **kwargs)


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local core attention, and with a ``PackedLayout`` torch's SDPA per document under its mask
    (module docstring). Dropout must be 0 (the trainer's): the packed path applies none."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, attention_dropout=None,
                 softmax_scale=None, **kwargs):
        super().__init__(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                         attention_type=attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, **kwargs)
        if self.attention_dropout.p:
            raise ValueError("packed attention applies no dropout; set attention_dropout 0")
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window = config.window_size[0] if windowed else None  # keys up to this many positions back

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type=None, attention_bias=None, packed_seq_params: PackedSeqParams | None = None):
        if not isinstance(packed_seq_params, PackedLayout):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        layout = packed_seq_params
        length, _, heads, head_size = query.shape  # [L, 1, heads / TP, d]
        repeats = heads // key.shape[2]  # grouped-query attention: each key/value head serves `repeats` queries
        q = query[:, 0].transpose(0, 1)
        k = key[:, 0].repeat_interleave(repeats, dim=1).transpose(0, 1)
        v = value[:, 0].repeat_interleave(repeats, dim=1).transpose(0, 1)
        outputs = []
        for (start, end), mask in zip(zip(layout.bounds, layout.bounds[1:]), layout.masks):
            if self.window is not None:
                position = layout.positions[start:end]
                near = (position[:, None] - position[None, :]) <= self.window
                mask = near & (mask if mask is not None else torch.ones_like(near).tril())
            outputs.append(F.scaled_dot_product_attention(
                q[:, start:end], k[:, start:end], v[:, start:end], attn_mask=mask, is_causal=mask is None,
                scale=self.softmax_scale))
        context = torch.cat(outputs, dim=1)  # [heads, L, d]
        return context.transpose(0, 1).reshape(length, 1, heads * head_size)
