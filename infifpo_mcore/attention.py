"""Attention over packed micro-batches (``packing``) in Megatron-Core's local layer spec: every device without
Transformer Engine (the CPU, GPUs without TE) and Gemma 3's layer everywhere.

A packed row ``[1, L]`` holds documents one after the other (``batch["documents"]``, cu_seqlens), then a pad tail
that attends to nothing. Megatron's local ``DotProductAttention`` refuses packed sequences;
``PackedDotProductAttention`` gathers the documents into a padded batch and runs torch's
``scaled_dot_product_attention`` once per layer, with the mask that isolates each:

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
    attention. The D documents are gathered into a padded ``[D, n]`` batch (n the longest), attended in one call:

        index     [D, n] int64   the row position of each document token (0 where the document is shorter)
        valid     [D, n] bool    where ``index`` is a token of the document
        used      int            the row's tokens in documents (the pad tail after them attends to nothing)
        positions [D, n] int64   each token's position (sliding windows)
        mask      [D, 1, n, n]   bool, True where a query may attend (branches apart), or None: plain causal

    ``row_positions [L]``: each row token's position (RoPE). Padding keys follow every real one of their document,
    so causality alone keeps them out."""

    row_positions: Tensor | None = None
    index: Tensor | None = None
    valid: Tensor | None = None
    used: int = 0
    positions: Tensor | None = None
    mask: Tensor | None = None


def packed_seq_params(batch: PreferenceBatch, *, thd: bool) -> PackedSeqParams:
    """The parameters a packed micro-batch travels with through the model: Megatron's THD ones for Transformer
    Engine's attention (``thd``), else a ``PackedLayout`` for ``PackedDotProductAttention``."""
    documents, length = batch["documents"], batch["tokens"].shape[1]
    bounds = documents.tolist()
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    if thd:  # the pad tail is one more sequence there: TE's THD kernels take every token of the row
        cu_seqlens = documents if bounds[-1] == length else torch.cat([documents, documents.new_tensor([length])])
        longest = max(lengths + [length - bounds[-1]])
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                               max_seqlen_q=longest, max_seqlen_kv=longest)
    device = batch["tokens"].device
    longest = max(lengths)
    offsets = torch.arange(longest, device=device)
    starts = documents[:-1].to(device=device, dtype=torch.int64)
    valid = offsets[None, :] < torch.tensor(lengths, device=device)[:, None]
    index = torch.where(valid, starts[:, None] + offsets[None, :], 0)
    row_positions, branches = batch["position_ids"][0], batch["branches"][0]
    mask = None
    if bool(branches.any()):
        branch = branches[index]  # [D, n]
        causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        mask = causal & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None]))
        # every query sees itself: padding queries then never have an empty row (NaN in the softmax's backward)
        mask = (mask | torch.eye(longest, dtype=torch.bool, device=device))[:, None]
    return PackedLayout(qkv_format="sbhd", cu_seqlens_q=documents, cu_seqlens_kv=documents, max_seqlen_q=length,
                        max_seqlen_kv=length, row_positions=row_positions, index=index, valid=valid,
                        used=bounds[-1], positions=row_positions[index], mask=mask)


class PackedSelfAttention(SelfAttention):
    """Megatron's SelfAttention; with a ``PackedLayout``, RoPE at each token's own position (module docstring)."""

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        if isinstance(packed_seq_params, PackedLayout) and rotary_pos_emb is not None:
            rotary_pos_emb = rotary_pos_emb[packed_seq_params.row_positions]  # [L, 1, 1, D] of positions 0..L-1
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb,
                               packed_seq_params=packed_seq_params, **kwargs)


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local core attention, and with a ``PackedLayout`` torch's SDPA over the documents under their
    masks (module docstring). Dropout must be 0 (the trainer's): the packed path applies none."""

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

        def documents(x: Tensor) -> Tensor:  # [L, 1, h, d] -> [D, heads, n, d]; grouped-query keys repeated per query
            return x[:, 0].repeat_interleave(heads // x.shape[2], dim=1)[layout.index].transpose(1, 2)

        mask = layout.mask
        if self.window is not None:
            near = (layout.positions[:, :, None] - layout.positions[:, None, :]) <= self.window
            causal = torch.ones(near.shape[-2:], dtype=torch.bool, device=near.device).tril()
            mask = near[:, None] & (mask if mask is not None else causal)
        output = F.scaled_dot_product_attention(documents(query), documents(key), documents(value), attn_mask=mask,
                                                is_causal=mask is None, scale=self.softmax_scale)
        context = output.transpose(1, 2)[layout.valid]  # [used, heads, d], the documents' tokens in row order
        tail = context.new_zeros(length - layout.used, heads, head_size)
        return torch.cat([context, tail]).reshape(length, 1, heads * head_size)
