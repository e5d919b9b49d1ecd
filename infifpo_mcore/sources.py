"""Offline source scoring: each configured source model scores every preference row with its own tokenizer and chat
template; the scores go to a resumable cache, then to a dataset in the InfiFPO format the trainer reads.

Per row and source, for each response y (chosen, rejected) after the prompt x rendered with the source's template:
``s = sum_t log p(y_t | x, y_<t)`` over the response tokens (the answer, then the template's end-of-turn token, as
the pivot counts them) and ``|y|``, the response length in that source's tokens. The dataset gets per-source lists
``fuse_{chosen,rejected}_logps = s`` and ``fuse_mean_{chosen,rejected}_logps = s / |y|``, in config order.

Score cache ``<out>.cache/``:
  - ``manifest.json``: ``{source name: fingerprint}`` of every source scored into it. A fingerprint hashes the
    weights (file names, sizes, first and last MiB of each weight file, config.json), the tokenizer files, the chat
    template and records the precision. A configured source whose name is in the manifest with another fingerprint
    is refused (stale cache); a new name is scored and added.
  - ``rank<r>.jsonl``: one line per finished chunk, ``{"source": name, "scores": {row_key: [chosen_sum,
    rejected_sum, chosen_tokens, rejected_tokens]}}``, appended, flushed and fsynced. A last line without its
    newline (killed while writing) is not read, and is cut before that rank appends again.
  - Row key: a hash of the row's prompt messages, chosen and rejected texts: an edited row is rescored, a row
    that moved or got another id keeps its scores.

Layout: rows are cut into chunks of ``sources.chunk_rows`` in input order and chunk c goes to rank c mod world
size; a source with ``tensor_parallel`` is sharded over all ranks, which score every chunk together (rank 0 writes
it). A chunk is scored and written as a unit, so a resumed (or re-laid-out) run scores the missing chunks in the
same batches as an uninterrupted run would, and writes the same output (bit for bit with the same thread count).
Rank 0 then writes ``<out>`` (input order, every input field kept) and ``<out>.sources.json`` (the fingerprints,
in fuse_* order).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from infifpo_mcore.atomic_files import write_atomically
from infifpo_mcore.checkpointing import LATEST
from infifpo_mcore.config import ConfigError, InfiFPOConfig, SourceConfig, resolve_precision
from infifpo_mcore.data import FUSE_FIELDS, PreferenceRow, read_preference_rows, row_key
from infifpo_mcore.packing import shared_prompt_rows
from infifpo_mcore.parallel import local_device, standalone_job
from infifpo_mcore.pivot_card import CARD_FILE
from infifpo_mcore.tokenization import ChatTokenizer, TokenizerError, build_tokenizer, resolve_path

logger = logging.getLogger(__name__)

# (chosen sum, rejected sum, chosen tokens, rejected tokens) of one row under one source
RowScores = tuple[float, float, int, int]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
FINGERPRINT_FIELDS = ("weights", "tokenizer", "chat_template", "precision")
_MIB = 1 << 20


class SourceError(RuntimeError):
    """A source model, its cache or the scoring output cannot be used as configured."""


def _digest(*parts: bytes | str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: ("ab", "c") != ("a", "bc")
    return hasher.hexdigest()[:16]


def _file_sample(path: Path) -> list[bytes | str]:
    """Name, size and the first and last MiB: cheap on multi-GB weights, and any re-export or re-quantisation
    changes the header or the size."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(_MIB)
        file.seek(max(size - _MIB, 0))
        tail = file.read(_MIB)
    return [path.name, str(size), head, tail]


def resolve_model_dir(source: SourceConfig) -> Path:
    """The directory of ``source.path`` (a plain path or ``pkg://package/dir``), checked to hold the weights: a HF
    model directory (or the GGUF file in it), or a Megatron-Core checkpoint (see ``is_megatron_checkpoint``)."""
    anchor = source.gguf_file or "config.json"
    if source.path.startswith("pkg://"):
        try:
            return resolve_path(f"{source.path.rstrip('/')}/{anchor}").parent
        except ValueError as error:
            raise SourceError(f"source {source.name!r}: {error}") from None
    directory = Path(source.path).expanduser()
    if is_megatron_checkpoint(directory):
        if source.gguf_file:
            raise SourceError(f"source {source.name!r}: {directory} is a Megatron-Core checkpoint; gguf_file "
                              f"({source.gguf_file}) applies to HF model directories only")
        return directory
    if not (directory / anchor).is_file():
        raise SourceError(f"source {source.name!r}: {directory / anchor} not found (path must be a model directory "
                          f"holding {'gguf_file' if source.gguf_file else 'config.json and the weights'}, or a "
                          "Megatron-Core checkpoint)")
    return directory


def is_megatron_checkpoint(directory: Path) -> bool:
    """A checkpoint root (its ``latest`` pointer) or one ``iter_*`` directory of this trainer or of
    checkpoints_tools/hf_to_mcore.py (its pivot card)."""
    return (directory / LATEST).is_file() or (directory / CARD_FILE).is_file()


# torchrun's variables: a tool started from a rank must set up its own one-process world, not join the job's
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                       "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def export_megatron_source(*, name: str, checkpoint: Path, out_dir: Path) -> Path:
    """A Megatron-Core checkpoint source as a HF model directory in ``out_dir``, written by
    checkpoints_tools/mcore_to_hf.py (bit-exact weights, the tokenizer files the checkpoint carries) in a process of
    its own: the export builds Megatron's parallel state, which must not meet this process's groups."""
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCHER_VARIABLES}
    command = [sys.executable, "-m", "checkpoints_tools.mcore_to_hf", "--ckpt", str(checkpoint), "--out", str(out_dir)]
    logger.info("source %r: exporting the Megatron-Core checkpoint %s to HF for scoring", name, checkpoint)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
        raise SourceError(f"source {name!r}: exporting the Megatron-Core checkpoint {checkpoint} to HF failed "
                          f"({' '.join(command)}): {' '.join(detail)}")
    return out_dir


def weights_fingerprint(*, model_dir: Path, gguf_file: str | None) -> str:
    """A hash of the GGUF file, or of every weight file and config.json of a HF directory (see ``_file_sample``)."""
    if gguf_file:
        files = [model_dir / gguf_file]
    else:
        files = sorted(path for path in model_dir.iterdir() if path.suffix in WEIGHT_SUFFIXES) + [
            model_dir / "config.json"]
        if len(files) == 1:
            raise SourceError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return _digest(*(part for path in files for part in _file_sample(path)))


@dataclass
class PreparedSource:
    """A source ready to score: its tokenizer built, its fingerprint taken; the model is loaded later."""
    name: str
    model_dir: Path
    gguf_file: str | None
    tokenizer: ChatTokenizer
    precision: str
    fingerprint: dict[str, str]
    tensor_parallel: bool = False  # sharded over every rank of the default process group (``load_model``)


def prepare_source(source: SourceConfig, *, device: torch.device, workdir: Path) -> PreparedSource:
    """Build the source's tokenizer (a GGUF source's own is exported to ``workdir``) and fingerprint it all; a
    Megatron-Core checkpoint is exported to a HF directory in ``workdir`` first and scored from there."""
    model_dir = resolve_model_dir(source)
    if is_megatron_checkpoint(model_dir):
        model_dir = export_megatron_source(name=source.name, checkpoint=model_dir, out_dir=workdir / "hf")
    try:
        precision = resolve_precision(source.precision, device=device, what=f"source {source.name!r} precision")
    except ConfigError as error:  # a source rank's error: raised as the source's, which every log shows
        raise SourceError(error.problems[0]) from None
    tokenizer_path = source.tokenizer.path
    if tokenizer_path is None and source.gguf_file:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir, gguf_file=source.gguf_file).save_pretrained(workdir)
        tokenizer_path = str(workdir / "tokenizer.json")
    elif tokenizer_path is None:
        tokenizer_path = str(model_dir / "tokenizer.json")
    try:
        tokenizer = build_tokenizer(type=str(source.tokenizer.type), path=tokenizer_path,
                                    chat_template=source.tokenizer.chat_template)
    except ValueError as error:
        raise SourceError(f"source {source.name!r}: {error}") from None
    tokenizer_files = [resolve_path(tokenizer_path)]
    hf_config = tokenizer_files[0].with_name("tokenizer_config.json")  # names a tokenizer.json's BOS/EOS/PAD
    if str(source.tokenizer.type) == "hf" and hf_config.is_file():
        tokenizer_files.append(hf_config)
    fingerprint = {
        "weights": weights_fingerprint(model_dir=model_dir, gguf_file=source.gguf_file),
        "tokenizer": _digest(*(path.read_bytes() for path in tokenizer_files)),
        "chat_template": _digest(tokenizer.template_source),
        "precision": precision,
    }
    return PreparedSource(name=source.name, model_dir=model_dir, gguf_file=source.gguf_file, tokenizer=tokenizer,
                          precision=precision, fingerprint=fingerprint, tensor_parallel=source.tensor_parallel)


def load_model(*, model_dir: Path, gguf_file: str | None, precision: str, device: torch.device,
               shards: int = 1) -> torch.nn.Module:
    """A transformers causal LM, frozen, in eval mode, on ``device``; a GGUF file is dequantised (slow: 15-90 s
    for ~100M parameters on a CPU; ``export_gguf_as_hf`` keeps an fp32 copy that loads in a second or two).

    ``shards`` > 1: tensor-parallel over the default process group, of that size, a collective. Each rank loads only
    its shard of the attention and MLP projections by the model family's own tensor-parallel plan (transformers
    shards over its whole default group, which is why a source is sharded over every scoring rank or none); every
    rank then runs the forward on the same batch and gets the full logits."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    sharding = {}
    if shards > 1:
        from transformers.distributed import DistributedConfig

        # tp_size explicitly: left out, transformers takes WORLD_SIZE, the whole job rather than the source group
        sharding = {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=shards)}
    # Weights from safetensors only (no pickled .bin); a GGUF file holds plain arrays.
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=dtype,
                                                 use_safetensors=None if gguf_file else True, **sharding)
    model.requires_grad_(False).eval().to(device)
    if precision == "fp8":
        _linear_layers_to_te(model)
    return model


def fp8_gemm_fits(layer: torch.nn.Linear) -> bool:
    """Whether Transformer Engine can run this layer's weight in an FP8 GEMM: it wants the weight's rows a multiple
    of 8 and its columns of 16 (the tokens are padded to fit, ``SourceScorer``); a layer that does not fit stays in
    bf16 rather than fail at the first forward."""
    return layer.out_features % 8 == 0 and layer.in_features % 16 == 0


def _linear_layers_to_te(model: torch.nn.Module) -> None:
    """Swap the transformer's nn.Linear layers (not the output head) for Transformer Engine ones, which run their
    matmuls in FP8 inside ``fp8_autocast``. Not yet run on a GPU; the CPU test box has neither FP8 nor TE."""
    import transformer_engine.pytorch as te

    head = model.get_output_embeddings()
    kept = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            if not fp8_gemm_fits(child):
                kept.append(f"{child_name} {child.in_features}->{child.out_features}")
                continue
            layer = te.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                              params_dtype=child.weight.dtype, device=child.weight.device)
            with torch.no_grad():
                layer.weight.copy_(child.weight)
                if child.bias is not None:
                    layer.bias.copy_(child.bias)
            setattr(parent, child_name, layer)
    if kept:
        logger.warning("%d linear layers stay in bf16 (FP8 GEMMs need rows %% 8 and columns %% 16), e.g. %s",
                       len(kept), kept[0])


def export_gguf_as_hf(*, path: str, gguf_file: str, out_dir: Path) -> Path:
    """Dequantise a GGUF model once and save it (fp32 weights, tokenizer, chat template) as a HF model directory
    that ``sources.models[i].path`` can name; written to ``<out_dir>.tmp`` and renamed when complete."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(SourceConfig(name=gguf_file, path=path, gguf_file=gguf_file))
    model = load_model(model_dir=model_dir, gguf_file=gguf_file, precision="fp32", device=torch.device("cpu"))
    # The weights are plain fp32 tensors now; these flags only make save_pretrained refuse the model.
    model.hf_quantizer, model.is_quantized = None, False
    del model.config.quantization_config
    staging = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file).save_pretrained(staging)
    staging.replace(out_dir)
    return out_dir


def length_batches(*, lengths: Sequence[int], batch_tokens: int) -> list[range]:
    """Consecutive index ranges of ``lengths`` (sorted longest first) whose padded size, count x first length, stays
    within ``batch_tokens``; a longer sequence gets a batch of its own."""
    batches, start = [], 0
    while start < len(lengths):
        count = max(1, batch_tokens // lengths[start])
        batches.append(range(start, min(start + count, len(lengths))))
        start += count
    return batches


class SourceScorer:
    """One source model with its chat tokenizer: response log-prob sums and token counts, forward only."""

    # FP8 GEMMs need the token count (batch x length) a multiple of 16; left padding is masked, so free to add
    FP8_LENGTH_MULTIPLE = 16

    def __init__(self, *, name: str, model: torch.nn.Module, tokenizer: ChatTokenizer, device: torch.device,
                 batch_tokens: int, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 reference_autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 length_multiple: int = 1, share_prompt: bool = True):
        """``autocast``: the context every forward runs in (FP8: TE's ``fp8_autocast``); ``reference_autocast``: the
        higher precision ``precision_check`` compares it with; ``length_multiple``: batches padded to it;
        ``share_prompt``: score a row's two responses in one sequence where that is exact (``shares_prompt``)."""
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.device, self.batch_tokens, self.length_multiple = device, batch_tokens, length_multiple
        self.autocast, self.reference_autocast = autocast, reference_autocast
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        # logits_to_keep computes the output head only at the last positions (transformers >= 4.50 causal LMs)
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.share_prompt = share_prompt

    def shares_prompt(self, pairs: list[tuple[list[int], list[int], list[int]]]) -> bool:
        """Whether these (prompt, chosen, rejected) pairs are scored with their prompt shared: the row ``[prompt,
        chosen, last prompt token, rejected]`` under a custom 4D mask (``packing.shared_prompt_rows``), each response
        seeing the prompt and itself, gives each response the log-probs of its own sequence. Needs attention that
        takes such a mask (transformers' sdpa or eager) and, for a model with sliding windows, sequences no longer
        than the window (a custom mask replaces the model's own window)."""
        config = self.model.config
        if not self.share_prompt or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
            return False
        window = getattr(config, "sliding_window", None)
        if window is None or getattr(config, "use_sliding_window", True) is False:
            return True
        return all(len(prompt) + max(len(chosen), len(rejected)) <= window for prompt, chosen, rejected in pairs)

    def score(self, rows: Sequence[PreferenceRow]) -> list[RowScores]:
        """Per row (in order): chosen and rejected log-prob sums and their token counts under this source.

        The 2 x len(rows) sequences (or, with a shared prompt, the len(rows) shared rows) are sorted by length
        (longest first, ties in row order) and cut into batches of at most ``batch_tokens`` padded tokens, so the
        result depends only on ``rows``.
        """
        pairs = self.encode_pairs(rows)
        if self.shares_prompt(pairs):
            return self._score_shared(pairs)
        sequences = self._sequences(pairs)
        sums = [0.0] * len(sequences)
        for indices in self.batches(sequences):
            batch_sums = self._response_logps([sequences[index] for index in indices])
            for index, value in zip(indices, batch_sums.tolist(), strict=True):
                sums[index] = value
        return [(sums[2 * i], sums[2 * i + 1], sequences[2 * i][1], sequences[2 * i + 1][1]) for i in range(len(rows))]

    def precision_check(self, rows: Sequence[PreferenceRow]) -> dict[str, float] | None:
        """|delta log-prob| per response token of ``rows`` between this scorer's precision and its reference (FP8
        GEMMs against the same layers' bf16 GEMMs): rows, tokens, mean and max in nats; None without a reference."""
        if self.reference_autocast is None:
            return None
        sequences = self.encode(rows)
        deltas = []
        for indices in self.batches(sequences):
            batch = [sequences[index] for index in indices]
            logps, is_response = self.response_token_logps(batch)
            reference, _ = self.response_token_logps(batch, autocast=self.reference_autocast)
            deltas.append((logps - reference).abs()[is_response])
        delta = torch.cat(deltas)
        return {"rows": len(rows), "tokens": delta.numel(), "mean_abs_delta": delta.mean().item(),
                "max_abs_delta": delta.max().item()}

    def batches(self, sequences: list[tuple[list[int], int]]) -> list[list[int]]:
        """Indices of ``sequences`` in the batches ``score`` runs: sorted by length (longest first, ties in order),
        at most ``batch_tokens`` padded tokens each."""
        order = sorted(range(len(sequences)), key=lambda index: -len(sequences[index][0]))
        lengths = [len(sequences[index][0]) for index in order]
        return [[order[position] for position in batch]
                for batch in length_batches(lengths=lengths, batch_tokens=self.batch_tokens)]

    def encode_pairs(self, rows: Sequence[PreferenceRow]) -> list[tuple[list[int], list[int], list[int]]]:
        """(prompt, chosen, rejected) ids of each row in this source's tokens, in row order."""
        pairs = []
        for row in rows:
            try:
                prompt = self.tokenizer.encode_prompt(row.prompt)
                responses = [self.tokenizer.encode_response(text, prompt=row.prompt)
                             for text in (row.chosen, row.rejected)]
            except TokenizerError as error:  # e.g. a template that allows no system message
                raise SourceError(f"source {self.name!r}: row {row.id!r}: {error}") from None
            for response in responses:
                if self.max_length is not None and len(prompt) + len(response) > self.max_length:
                    raise SourceError(f"source {self.name!r}: row {row.id!r} has {len(prompt) + len(response)} "
                                      f"tokens, more than the model's max_position_embeddings {self.max_length}")
            pairs.append((prompt, *responses))
        return pairs

    def encode(self, rows: Sequence[PreferenceRow]) -> list[tuple[list[int], int]]:
        """(prompt + response ids, response length) of each row's chosen, then rejected response, in row order."""
        return self._sequences(self.encode_pairs(rows))

    @staticmethod
    def _sequences(pairs: list[tuple[list[int], list[int], list[int]]]) -> list[tuple[list[int], int]]:
        return [(prompt + response, len(response)) for prompt, *responses in pairs for response in responses]

    def _score_shared(self, pairs: list[tuple[list[int], list[int], list[int]]]) -> list[RowScores]:
        """``score`` with each pair's prompt computed once (``shares_prompt``)."""
        layouts = [(prompt + chosen + prompt[-1:] + rejected, 0) for prompt, chosen, rejected in pairs]
        sums: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
        for indices in self.batches(layouts):
            for index, values in zip(indices, self._shared_logps([pairs[i] for i in indices]).tolist(), strict=True):
                sums[index] = tuple(values)
        return [(chosen_sum, rejected_sum, len(chosen), len(rejected))
                for (chosen_sum, rejected_sum), (_, chosen, rejected) in zip(sums, pairs, strict=True)]

    @torch.no_grad()
    def _shared_logps(self, pairs: list[tuple[list[int], list[int], list[int]]]) -> torch.Tensor:
        """[B, 2] float64 chosen and rejected log-prob sums of B pairs, one row each (``packing.shared_prompt_rows``)."""
        rows = shared_prompt_rows(pairs, pad_id=self.tokenizer.pad_id, length_multiple=self.length_multiple)
        keep = rows["keep"]
        dtype = next(self.model.parameters()).dtype
        # additive (0 / most negative): what both sdpa and eager attention add; a padding query sees no key and
        # attends uniformly instead of producing NaN
        mask = torch.zeros(rows["allowed"].shape, dtype=dtype).masked_fill(~rows["allowed"], torch.finfo(dtype).min)
        extra = {"logits_to_keep": keep} if self._keep_logits else {}
        with self.autocast():
            logits = self.model(input_ids=rows["input_ids"].to(self.device), attention_mask=mask[:, None].to(self.device),
                                position_ids=rows["position_ids"].to(self.device), use_cache=False, **extra).logits
        logits = logits[:, -keep:-1].float()
        targets = rows["input_ids"][:, -keep + 1:].to(self.device)
        token_logps = (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)).double()
        return torch.stack([torch.where(rows[name].to(self.device), token_logps, 0.0).sum(-1)
                            for name in ("chosen", "rejected")], dim=-1).cpu()

    def _response_logps(self, sequences: list[tuple[list[int], int]]) -> torch.Tensor:
        """[B] float64 response log-prob sums of B (ids, response length) sequences."""
        token_logps, is_response = self.response_token_logps(sequences)
        # where, not a product: padding positions may hold NaN (their attention rows are fully masked)
        return torch.where(is_response, token_logps, 0.0).sum(-1).cpu()

    @torch.no_grad()
    def response_token_logps(self, sequences: list[tuple[list[int], int]], *,
                             autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, K-1]`` float64 per-token log-probs of B (ids, response length) sequences and the ``[B, K-1]`` mask
        of their response tokens (K = max response length + 1). The batch is left-padded so that every response ends
        at the last position and only the last K positions need logits, to a length multiple of
        ``length_multiple``."""
        length = -(-max(len(ids) for ids, _ in sequences) // self.length_multiple) * self.length_multiple
        keep = max(response for _, response in sequences) + 1
        input_ids = torch.full((len(sequences), length), self.tokenizer.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.int64)
        for row, (ids, _) in enumerate(sequences):
            input_ids[row, length - len(ids):] = torch.tensor(ids)
            attention_mask[row, length - len(ids):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # each sequence counts from 0 after its padding
        extra = {"logits_to_keep": keep} if self._keep_logits else {}
        with (autocast or self.autocast)():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                position_ids=position_ids.to(self.device), use_cache=False, **extra).logits
        logits = logits[:, -keep:-1].float()  # [B, K-1, V]: predicts the last K-1 tokens
        targets = input_ids[:, length - keep + 1:].to(self.device)  # [B, K-1]
        token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        responses = torch.tensor([response for _, response in sequences], device=self.device)
        is_response = torch.arange(keep - 1, device=self.device) >= (keep - 1 - responses).unsqueeze(1)
        return token_logps.double(), is_response


def check_shardable(source: PreparedSource, *, ranks: int) -> None:
    """A clear error, before any loading, where ``ranks`` shards cannot split the source's attention heads (the
    tensor-parallel plan gives each rank whole heads; transformers would fail deep in the forward instead)."""
    config = json.loads((source.model_dir / "config.json").read_text())
    config = config.get("text_config", config)  # multimodal families (Gemma 3) keep the language model's apart
    heads = config.get("num_attention_heads")
    counts = {"attention heads": heads, "key/value heads": config.get("num_key_value_heads", heads)}
    uneven = [f"{count} {what}" for what, count in counts.items() if count is not None and count % ranks]
    if uneven:
        raise SourceError(f"source {source.name!r}: tensor_parallel over {ranks} ranks cannot split its "
                          f"{' and '.join(uneven)}; use a number of scoring ranks that divides them, or set "
                          "tensor_parallel false")


def build_scorer(source: PreparedSource, *, device: torch.device, batch_tokens: int,
                 share_prompt: bool = True) -> SourceScorer:
    """The source's model loaded (sharded when ``source.tensor_parallel``: a collective, see ``load_model``).
    ``share_prompt`` (``sources.share_prompt``): where exact, each row's prompt is computed once (not for a sharded
    source, whose attention with a custom mask has not been checked)."""
    distributed = torch.distributed.is_initialized()
    shards = torch.distributed.get_world_size() if source.tensor_parallel and distributed else 1
    if shards > 1:
        check_shardable(source, ranks=shards)
    model = load_model(model_dir=source.model_dir, gguf_file=source.gguf_file, precision=source.precision,
                       device=device, shards=shards)
    if shards > 1 and torch.distributed.get_rank() == 0:
        from torch.distributed.tensor import DTensor

        held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        logger.info("source %r sharded over %d ranks: %.1f%% of its %d parameters on each rank", source.name,
                    shards, 100 * held / total, total)
    precision = {}
    if source.precision == "fp8":
        import transformer_engine.pytorch as te

        precision = {"autocast": lambda: te.fp8_autocast(enabled=True),
                     # the same TE layers with FP8 off: bf16 GEMMs on the same weights, no second copy loaded
                     "reference_autocast": lambda: te.fp8_autocast(enabled=False),
                     "length_multiple": SourceScorer.FP8_LENGTH_MULTIPLE}
    return SourceScorer(name=source.name, model=model, tokenizer=source.tokenizer, device=device,
                        batch_tokens=batch_tokens, share_prompt=share_prompt and shards == 1, **precision)


# Mean |delta log-prob| per token above which the FP8 check warns (issue #8's goal for FP8 scoring)
PRECISION_CHECK_TOLERANCE = 0.02


def report_precision_check(scorer: SourceScorer, rows: Sequence[PreferenceRow]) -> dict[str, float] | None:
    """Runs ``scorer.precision_check`` on ``rows`` (none: nothing) and logs it; a warning above the tolerance."""
    check = scorer.precision_check(rows) if rows else None
    if check is not None:
        above = check["mean_abs_delta"] > PRECISION_CHECK_TOLERANCE
        (logger.warning if above else logger.info)(
            "source %r precision check on %d rows (%d response tokens): |delta log-prob| vs its reference precision "
            "mean %.2g, max %.2g nats per token%s", scorer.name, check["rows"], check["tokens"],
            check["mean_abs_delta"], check["max_abs_delta"],
            f" — above {PRECISION_CHECK_TOLERANCE}: consider precision bf16" if above else "")
    return check


class ScoreCache:
    """The ``<out>.cache/`` directory (see the module docstring for its files)."""

    def __init__(self, *, directory: Path):
        self.directory = directory
        self.manifest_path = directory / "manifest.json"

    def manifest(self) -> dict[str, dict[str, str]]:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {}

    def check(self, fingerprints: dict[str, dict[str, str]]) -> None:
        """Raise SourceError for each configured source the cache holds with another fingerprint."""
        problems = []
        for name, recorded in self.manifest().items():
            current = fingerprints.get(name)
            changed = [f"{field} ({recorded.get(field)} -> {current[field]})" for field in FINGERPRINT_FIELDS
                       if current is not None and recorded.get(field) != current[field]]
            if changed:
                problems.append(f"source {name!r}: {', '.join(changed)} changed since its scores were cached")
        if problems:
            raise SourceError(f"stale score cache {self.directory}:\n  " + "\n  ".join(problems) + "\nDelete "
                              f"{self.directory} to rescore everything, or give a changed source a new name.")

    def register(self, fingerprints: dict[str, dict[str, str]]) -> None:
        """Add the configured sources to the manifest (rank 0 only; atomic replace)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.manifest_path, json.dumps({**self.manifest(), **fingerprints}, indent=2))

    def load(self) -> dict[str, dict[str, RowScores]]:
        """``{source name: {row key: scores}}`` from every complete line of every part file."""
        scores: dict[str, dict[str, RowScores]] = {}
        for part in sorted(self.directory.glob("rank*.jsonl")):
            for line in part.read_bytes().split(b"\n")[:-1]:  # the piece after the last newline is incomplete
                record = json.loads(line)
                scores.setdefault(record["source"], {}).update(
                    {key: tuple(values) for key, values in record["scores"].items()})
        return scores

    @contextlib.contextmanager
    def appender(self, *, rank: int) -> Iterator[Callable[..., None]]:
        """``append(source=..., scores=...)``: one line on this rank's part file (its incomplete last line, if
        any, cut first), flushed and fsynced."""
        part = self.directory / f"rank{rank}.jsonl"
        if part.is_file():
            data = part.read_bytes()
            with part.open("r+b") as file:
                file.truncate(data.rfind(b"\n") + 1)
        with part.open("a", encoding="utf-8") as file:
            def append(*, source: str, scores: dict[str, RowScores]) -> None:
                file.write(json.dumps({"source": source, "scores": scores}) + "\n")
                file.flush()
                os.fsync(file.fileno())  # a finished chunk survives a crash of the machine, not only of the process

            yield append


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _check_output(*, out: Path, data_path: Path) -> None:
    if out.resolve() == data_path.resolve():
        raise SourceError(f"the output {out} is the input data.path; write the scored dataset elsewhere")
    sidecar = out.with_name(out.name + ".sources.json")
    if out.exists() and not sidecar.is_file():
        raise SourceError(f"{out} exists and was not written by the source scorer (no {sidecar.name} beside it); "
                          "remove it or choose another output path")


def score_sources(cfg: InfiFPOConfig, *, out: str | None = None) -> Path:
    """Score ``cfg.data.path`` with every source in ``cfg.sources.models`` and write the InfiFPO-format dataset to
    ``out`` (default ``cfg.sources.output``); resumes from ``<out>.cache``. Run it on every rank of a torchrun job
    or in one plain process. Returns the output path."""
    out_path = Path(out or cfg.sources.output or "")
    if not out_path.name:
        raise SourceError("no output path: set sources.output or pass --out")
    if not cfg.sources.models:
        raise SourceError("no source models configured: set sources.models (see launch/configs/tiny_cpu.yaml)")
    data_path = Path(cfg.data.path)
    rows = read_preference_rows(data_path, split=cfg.data.split)
    _check_output(out=out_path, data_path=data_path)
    keys = [row_key(row) for row in rows]
    cache = ScoreCache(directory=out_path.with_name(out_path.name + ".cache"))
    device = local_device()
    # Ranks done with their chunks wait at a barrier for the slowest: a long scoring job must not time out there.
    with standalone_job(timeout=timedelta(hours=24)) as (rank, world), tempfile.TemporaryDirectory() as workdir:
        sources = [prepare_source(source, device=device, workdir=Path(workdir) / str(index))
                   for index, source in enumerate(cfg.sources.models)]
        fingerprints = {source.name: source.fingerprint for source in sources}
        cache.check(fingerprints)
        _barrier(world)  # every rank checked the manifest before rank 0 changes it
        if rank == 0:
            cache.register(fingerprints)
        _barrier(world)
        scored = cache.load()
        chunk = cfg.sources.chunk_rows
        chunks = [range(start, min(start + chunk, len(rows))) for start in range(0, len(rows), chunk)]
        with cache.appender(rank=rank) as append:
            for source in sources:
                done = scored.get(source.name, {})
                # A sharded source is one model over all ranks: they score every chunk together, rank 0 writes.
                mine = chunks if source.tensor_parallel else chunks[rank::world]
                todo = [[index for index in piece if keys[index] not in done] for piece in mine]
                writes = rank == 0 or not source.tensor_parallel
                _score_chunks(source, todo=[piece for piece in todo if piece], rows=rows, keys=keys,
                              append=append if writes else None, device=device,
                              batch_tokens=cfg.sources.batch_tokens, rank=rank, world=world,
                              check_rows=cfg.sources.precision_check_rows, share_prompt=cfg.sources.share_prompt)
        _barrier(world)
        if rank == 0:
            _write_output(out=out_path, rows=rows, keys=keys, data_path=data_path, sources=sources,
                          scored=cache.load())
        _barrier(world)
    return out_path


def _score_chunks(source: PreparedSource, *, todo: list[list[int]], rows: list[PreferenceRow], keys: list[str],
                  append: Callable[..., None] | None, device: torch.device, batch_tokens: int, rank: int,
                  world: int, check_rows: int, share_prompt: bool) -> None:
    """Score the ``todo`` chunks and ``append`` each (None: a shard of a sharded source, whose rank 0 writes)."""
    if not todo:
        return
    from tqdm import tqdm

    scorer = build_scorer(source, device=device, batch_tokens=batch_tokens, share_prompt=share_prompt)
    if rank == 0:
        report_precision_check(scorer, [rows[index] for index in todo[0][:check_rows]])
    if source.tensor_parallel and world > 1:
        label = f"{source.name} (sharded over {world} ranks)"
    else:
        label = f"{source.name} (rank 0 of {world})" if world > 1 else source.name
    with tqdm(total=sum(map(len, todo)), desc=label, unit="row", disable=rank != 0, dynamic_ncols=True) as bar:
        for piece in todo:
            scores = scorer.score([rows[index] for index in piece])
            if append is not None:
                append(source=source.name,
                       scores={keys[index]: value for index, value in zip(piece, scores, strict=True)})
            bar.update(len(piece))
    del scorer
    gc.collect()  # free this source's weights before the next one loads
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _write_output(*, out: Path, rows: list[PreferenceRow], keys: list[str], data_path: Path,
                  sources: list[PreparedSource], scored: dict[str, dict[str, RowScores]]) -> None:
    """Each input row (all its fields, an ``id`` added when it had none) with the fuse_* lists; the sidecar first,
    then the dataset, each through a temporary file, so a crash never leaves a dataset without its sidecar."""
    missing = [(source.name, row.id) for source in sources for row, key in zip(rows, keys)
               if key not in scored.get(source.name, {})]
    if missing:
        raise SourceError(f"{len(missing)} (source, row) scores missing from the cache after scoring, e.g. "
                          f"{missing[:3]}; was a rank stopped? Run again to score them.")
    sidecar = out.with_name(out.name + ".sources.json")
    write_atomically(sidecar, json.dumps({"data": str(data_path), "rows": len(rows),
                                           "sources": [{"name": s.name, **s.fingerprint} for s in sources]}, indent=2))
    replaced = 0
    lines = []
    for row, key in zip(rows, keys):
        record = dict(row.fields)  # as parsed when the rows were validated: the file is read once
        replaced += any(field in record for field in FUSE_FIELDS)
        record.setdefault("id", row.id)
        values = [scored[source.name][key] for source in sources]
        # In data.FUSE_FIELDS order (chosen sums, rejected sums, chosen means, rejected means): the names the
        # trainer's reader validates, written from one definition.
        fused = (
            [chosen for chosen, _, _, _ in values],
            [rejected for _, rejected, _, _ in values],
            [chosen / count for chosen, _, count, _ in values],
            [rejected / count for _, rejected, _, count in values],
        )
        record.update(zip(FUSE_FIELDS, fused))
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_atomically(out, "".join(lines))
    if replaced:
        logger.warning("%d input rows already had fuse_* scores; they were replaced", replaced)
    logger.info("wrote %s: %d rows x %d source(s) (%s)", out, len(rows), len(sources),
                ", ".join(source.name for source in sources))
