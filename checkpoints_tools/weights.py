"""HF tensors <-> Megatron-Core GPTModel tensors (whole, unsharded: TP 1 / PP 1 names), and HF safetensors files.

Every HF tensor must be consumed exactly once and every Megatron tensor produced: a tensor the adapter does not
know (an ``o_proj.bias``, an MLP bias, an extra norm) is refused by name rather than dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import torch

from infifpo_mcore.config import ModelConfig, head_dim
from checkpoints_tools.families import (HF_EMBEDDING, HF_OUTPUT, MEGATRON_EMBEDDING, MEGATRON_FC1, MEGATRON_OUTPUT,
                                        MEGATRON_QKV, HF_FUSED_GATE_UP, HF_FUSED_QKV, HF_SPLIT_GATE_UP, HF_SPLIT_QKV,
                                        AttentionShape, Family, qkv_from_megatron, qkv_to_megatron, split_fused_qkv)
from checkpoints_tools.hf_config import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some older HF checkpoints stored; recomputed from the config, never weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def attention_shape(model: ModelConfig) -> AttentionShape:
    return AttentionShape(heads=model.num_attention_heads, groups=model.num_query_groups, head_dim=head_dim(model))


def _qkv_kinds(model: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if model.add_qkv_bias else ("weight",)


class HFTensors(Mapping[str, torch.Tensor]):
    """The tensors of a HF model directory, each read from its (memory-mapped) safetensors file when asked for: a
    conversion holds one HF tensor at a time, never the whole HF copy."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._file_of = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                self._file_of.update(dict.fromkeys(handle.keys(), path))

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def read_hf_tensors(hf_dir: Path) -> HFTensors:
    """All tensors of a HF model directory (one model.safetensors or an index of shards), read lazily."""
    if (hf_dir / INDEX_FILE).is_file():
        index = json.loads((hf_dir / INDEX_FILE).read_text(encoding="utf-8"))
        files = sorted(set(index["weight_map"].values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        other = sorted(path.name for path in hf_dir.glob("*.bin")) + sorted(path.name for path in hf_dir.glob("*.gguf"))
        hint = (f" (found {', '.join(other)}: load it with transformers and save_pretrained it as safetensors)"
                if other else "")
        raise ConversionError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    return HFTensors([hf_dir / name for name in files])


def write_hf_tensors(tensors: Mapping[str, torch.Tensor], *, out_dir: Path, max_shard_bytes: int,
                     dtype: torch.dtype | None = None) -> list[str]:
    """HF's layout: model.safetensors, or model-0000i-of-0000n.safetensors shards + model.safetensors.index.json,
    in ``dtype`` (default: each tensor's own). The tensors may be views into the model's parameters: each shard is
    copied out only while it is written, so an export holds the model plus one shard. Returns the file names."""
    from safetensors.torch import save_file

    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * (dtype or tensor.dtype).itemsize

    def copied(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # own storage per tensor: safetensors refuses views of one tensor saved apart
        return {name: tensor.to(dtype or tensor.dtype, copy=True).contiguous() for name, tensor in shard.items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + nbytes(tensor) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes(tensor)
    if len(shards) == 1:
        save_file(copied(shards[0]), str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(copied(shard), str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(nbytes(tensor) for tensor in tensors.values())
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    return names + [INDEX_FILE]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The vocabulary padded to the pivot's size with zero rows (never predicted: their logits are sliced off)."""
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def hf_to_megatron(*, hf: Mapping[str, torch.Tensor], family: Family, model: ModelConfig, padded_vocab: int,
                   source: str, out: MutableMapping[str, torch.Tensor] | None = None
                   ) -> tuple[MutableMapping[str, torch.Tensor], dict[str, str]]:
    """Megatron's full state dict from HF tensors; also each Megatron name's HF origin, for error messages.
    ``out``: where each Megatron tensor goes as it is made (default a new dict)."""
    unused = {name for name in hf if not name.endswith(_IGNORED_SUFFIXES)}
    out = {} if out is None else out
    origin: dict[str, str] = {}

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ConversionError(f"{source}: tensor {name!r} is missing (expected in a {family.architecture})")
        unused.discard(name)
        return hf[name]

    shape = attention_shape(model)
    for layer in range(model.num_layers):
        for kind in _qkv_kinds(model):
            if family.fused_qkv:
                name = HF_FUSED_QKV.format(layer, kind)
                q, k, v = split_fused_qkv(take(name), shape=shape)
            else:
                name = HF_SPLIT_QKV["q"].format(layer, kind)
                q, k, v = (take(template.format(layer, kind)) for template in HF_SPLIT_QKV.values())
            out[MEGATRON_QKV.format(layer, kind)] = qkv_to_megatron(q=q, k=k, v=v, shape=shape)
            origin[MEGATRON_QKV.format(layer, kind)] = name
        if family.fused_gate_up:  # HF's gate_up_proj is already Megatron's [gate; up]
            name = HF_FUSED_GATE_UP.format(layer)
            out[MEGATRON_FC1.format(layer)] = take(name)
        else:
            name = HF_SPLIT_GATE_UP["gate"].format(layer)
            out[MEGATRON_FC1.format(layer)] = torch.cat([take(t.format(layer)) for t in HF_SPLIT_GATE_UP.values()])
        origin[MEGATRON_FC1.format(layer)] = name
    for megatron, hf_name in family.one_to_one.items():
        for layer in range(model.num_layers) if "{}" in megatron else [None]:
            origin[megatron.format(layer)] = hf_name.format(layer)
            out[megatron.format(layer)] = take(hf_name.format(layer))
    embedding = take(HF_EMBEDDING)
    _check_vocab(embedding, model=model, name=HF_EMBEDDING, source=source)
    out[MEGATRON_EMBEDDING], origin[MEGATRON_EMBEDDING] = _pad_rows(embedding, padded_vocab), HF_EMBEDDING
    if not model.tie_embeddings:
        output = take(HF_OUTPUT)
        _check_vocab(output, model=model, name=HF_OUTPUT, source=source)
        out[MEGATRON_OUTPUT], origin[MEGATRON_OUTPUT] = _pad_rows(output, padded_vocab), HF_OUTPUT
    elif HF_OUTPUT in hf:  # some tied checkpoints store the shared matrix twice
        if not torch.equal(take(HF_OUTPUT), embedding):
            raise ConversionError(f"{source}: tie_word_embeddings is true but {HF_OUTPUT} differs from {HF_EMBEDDING}")
    if unused:
        raise ConversionError(f"{source}: tensors the {family.architecture} adapter cannot honour (the pivot has no "
                              f"place for them): {', '.join(sorted(unused)[:8])}"
                              + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    return out, origin


def _check_vocab(tensor: torch.Tensor, *, model: ModelConfig, name: str, source: str) -> None:
    if tuple(tensor.shape) != (model.vocab_size, model.hidden_size):
        raise ConversionError(f"{source}: {name} has shape {tuple(tensor.shape)}, config.json says "
                              f"vocab_size x hidden_size = ({model.vocab_size}, {model.hidden_size})")


def megatron_to_hf(*, state: Mapping[str, torch.Tensor], family: Family, model: ModelConfig,
                   vocab_size: int) -> dict[str, torch.Tensor]:
    """HF tensors (HF's names and fused layouts) from Megatron's full state dict, as views of its tensors where the
    layout allows (``write_hf_tensors`` copies them out shard by shard); the padded vocabulary is sliced back to
    `vocab_size` rows."""
    out: dict[str, torch.Tensor] = {HF_EMBEDDING: state[MEGATRON_EMBEDDING][:vocab_size]}
    shape = attention_shape(model)
    for layer in range(model.num_layers):
        for kind in _qkv_kinds(model):
            q, k, v = qkv_from_megatron(state[MEGATRON_QKV.format(layer, kind)], shape=shape)
            if family.fused_qkv:
                out[HF_FUSED_QKV.format(layer, kind)] = torch.cat([q, k, v])
            else:
                out.update({template.format(layer, kind): tensor
                            for template, tensor in zip(HF_SPLIT_QKV.values(), (q, k, v))})
        fc1 = state[MEGATRON_FC1.format(layer)]
        if family.fused_gate_up:
            out[HF_FUSED_GATE_UP.format(layer)] = fc1
        else:
            gate, up = fc1.chunk(2)
            out[HF_SPLIT_GATE_UP["gate"].format(layer)], out[HF_SPLIT_GATE_UP["up"].format(layer)] = gate, up
    for megatron, hf_name in family.one_to_one.items():
        for layer in range(model.num_layers) if "{}" in megatron else [None]:
            out[hf_name.format(layer)] = state[megatron.format(layer)]
    if not model.tie_embeddings:
        out[HF_OUTPUT] = state[MEGATRON_OUTPUT][:vocab_size]
    return out
