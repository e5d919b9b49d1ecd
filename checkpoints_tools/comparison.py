"""The same token sequences through HF transformers and through the Megatron pivot at this process layout.

Megatron's side runs the real pipeline schedule (forward only) at any TP / PP; the last stage gathers its
vocab-sharded logits over the tensor-parallel group and keeps HF's ``vocab_size`` columns (the padding is never a
token). Sequences are right-padded into one micro-batch; causal attention keeps padding out of the real positions,
which are the only ones compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from infifpo_mcore.parallel import ParallelContext


@dataclass
class Comparison:
    """Over the real positions of every sequence: logits and next-token log-probs, HF vs the pivot."""

    max_abs_logit_delta: float
    max_abs_logprob_delta: float  # per token: log p(next token), both models
    mean_abs_logprob_delta: float
    tokens: int
    next_tokens: int = 0  # positions whose next token is compared (the mean's denominator)

    @staticmethod
    def combine(results: list[Comparison]) -> Comparison:
        """One comparison over the sequences of several (e.g. one sequence each)."""
        next_tokens = sum(result.next_tokens for result in results)
        return Comparison(
            max_abs_logit_delta=max(result.max_abs_logit_delta for result in results),
            max_abs_logprob_delta=max(result.max_abs_logprob_delta for result in results),
            mean_abs_logprob_delta=sum(result.mean_abs_logprob_delta * result.next_tokens for result in results)
            / max(next_tokens, 1),
            tokens=sum(result.tokens for result in results), next_tokens=next_tokens)

    def format(self) -> str:
        return (f"max |delta logit| {self.max_abs_logit_delta:.3e}, log-prob per token: "
                f"max |delta| {self.max_abs_logprob_delta:.3e}, mean |delta| {self.mean_abs_logprob_delta:.3e} "
                f"({self.tokens} tokens)")


def padded_batch(sequences: list[list[int]], *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, S] right-padded, and lengths [B]."""
    length = max(len(ids) for ids in sequences)
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens, torch.tensor([len(ids) for ids in sequences])


def megatron_logits(model_chunks, *, tokens: torch.Tensor, vocab_size: int,
                    ctx: ParallelContext) -> torch.Tensor | None:
    """Full logits [B, S, vocab_size] on the last pipeline stage (every TP rank), None on the other stages."""
    batch, length = tokens.shape
    positions = torch.arange(length).expand(batch, length)

    def forward_step(data_iterator, model):
        next(data_iterator)
        output = model(tokens.to(ctx.device), positions.to(ctx.device), None)  # [B, S, V/TP] on the last stage
        return output, lambda logits: (torch.zeros((), device=logits.device), {"logits": logits.detach()})

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=model_chunks[0], num_microbatches=1,
            seq_length=length, micro_batch_size=batch, decoder_seq_length=length, forward_only=True)
    if not ctx.is_last_stage:
        return None
    local = outputs[0]["logits"].contiguous()
    shards = [torch.empty_like(local) for _ in range(ctx.tensor)]
    dist.all_gather(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., :vocab_size].cpu()


def hf_model(hf_dir: Path):
    """HF transformers' model of `hf_dir`, fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def hf_logits(hf_dir: Path | torch.nn.Module, *, tokens: torch.Tensor) -> torch.Tensor:
    """HF transformers' logits [B, S, V] in fp32 (`hf_dir`: a model directory, or the model of ``hf_model``)."""
    model = hf_model(hf_dir) if isinstance(hf_dir, Path) else hf_dir
    with torch.no_grad():
        return model(tokens).logits.float()


def compare(*, reference: torch.Tensor, ours: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
            chunk: int = 128) -> Comparison:
    """Both [B, S, V]; only positions < lengths count, log-probs of the actual next token. Computed `chunk`
    positions at a time: a 262k-token vocabulary (Gemma) makes each [B, S, V] copy gigabytes."""
    if reference.shape != ours.shape:
        raise ValueError(f"logits shapes differ: HF {tuple(reference.shape)} vs pivot {tuple(ours.shape)}")
    real = torch.arange(tokens.shape[1]) < lengths[:, None]  # [B, S]
    has_next = real & (torch.arange(1, tokens.shape[1] + 1) < lengths[:, None])  # position s predicts s + 1
    logit_max, logp_max, logp_sum = 0.0, 0.0, 0.0
    for start in range(0, tokens.shape[1], chunk):
        window = slice(start, start + chunk)
        logit_delta = (reference[:, window] - ours[:, window]).abs().amax(-1)[real[:, window]]
        logit_max = max(logit_max, logit_delta.max().item() if logit_delta.numel() else 0.0)
        next_ids = tokens[:, start + 1: start + chunk + 1, None]
        width = next_ids.shape[1]  # the last chunk's last position has no next token
        logps = [logits[:, start: start + width].log_softmax(-1).gather(-1, next_ids).squeeze(-1)
                 for logits in (reference, ours)]
        logp_delta = (logps[0] - logps[1]).abs()[has_next[:, start: start + width]]
        if logp_delta.numel():
            logp_max, logp_sum = max(logp_max, logp_delta.max().item()), logp_sum + logp_delta.sum().item()
    next_tokens = int(has_next.sum())
    return Comparison(max_abs_logit_delta=logit_max, max_abs_logprob_delta=logp_max,
                      mean_abs_logprob_delta=logp_sum / max(next_tokens, 1), tokens=int(real.sum()),
                      next_tokens=next_tokens)


DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Question: what is 17 + 25? Answer step by step.",
]


def prompt_sequences(*, hf_dir: Path, prompts: list[str], vocab_size: int,
                     seed: int = 0) -> tuple[list[list[int]], str]:
    """Token ids of `prompts` with the HF directory's tokenizer, and what produced them. A directory without a
    tokenizer (a random-initialised test model) gets seeded random ids, one sequence per prompt, as long as its text."""
    if (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer.model").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        return [tokenizer(prompt)["input_ids"] for prompt in prompts], f"the tokenizer of {hf_dir}"
    generator = torch.Generator().manual_seed(seed)
    return ([torch.randint(0, vocab_size, (max(2, len(prompt) // 4),), generator=generator).tolist()
             for prompt in prompts], f"random token ids ({hf_dir} has no tokenizer)")
