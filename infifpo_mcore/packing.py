"""Padding-free micro-batches: whole preference pairs packed into one row of at most a token budget.

Unpacked, a micro-batch of B pairs is ``[G*B, seq_length]`` tokens (G = 2 responses per pair, 3 with WRPO's
chosen_pivot), each ``prompt + response`` right-padded. Packed (``data.packing``), it is ``[1, L]``: the pairs'
sequences one after the other, L at most the budget (``token_budget``; by default ``micro_batch_size x G x
seq_length``, the unpacked micro-batch's size, so memory does not grow). Attention stays within each *document* of
the row and positions (RoPE, sliding windows) restart in each (``attention.PackedDotProductAttention``, or
Transformer Engine's THD path). The loss reads each response's log-probs as unpacked: ``response_slots`` names the
sequence every response token belongs to, in the unpacked order (chosen of pairs 0..B-1, rejected, chosen_pivot).

With ``data.share_prompt`` a pair is one document: its prompt but the last token once, then one *branch* per
response, each the prompt's last token followed by the response, positions continuing from the prompt. A branch
sees the shared prefix and itself, never another branch, so every response token sees exactly what it sees
unpacked: the duplicated last prompt token computes the same state as the unpacked one and predicts the response's
first token. The prompt is computed once per pair instead of G times (minus the G - 1 duplicated tokens).

Which pairs share a micro-batch: the sampler decides each rank's rows of a global batch exactly as unpacked; only
their split into micro-batches changes. ``pack`` fills micro-batches first-fit in decreasing size (deterministic:
ties in row order); every data-parallel rank must run the same number of micro-batches, so the trainer takes the
largest count over ranks and ``split_to`` splits the fullest micro-batches of the others until they have as many
(never an empty one: a rank has as many pairs as any other, and each pair fits alone). ``balance`` then evens the
micro-batches' token counts out (largest pair first into the emptiest), and every micro-batch of a step is cut to
the step's longest one, rounded up to ``ALIGN`` tokens (one shape per schedule call, for the pipeline's p2p): the
fewer and the more even the micro-batches, the fewer tokens a step computes and the more alike the pipeline's
micro-batch times. A pair never exceeds the budget: ``data.pack_tokens`` is refused below G x seq_length, and a pair's
sequences are truncated to ``model.seq_length`` as unpacked (counted and warned at load, ``data.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from infifpo_mcore.data import PreferenceBatch, PreferenceExample, responses_of

# Packed rows are cut to the step's longest micro-batch rounded up to this many tokens (FP8 GEMMs want multiples of 16)
ALIGN = 16


def token_budget(*, micro_batch_size: int, responses: int, seq_length: int, pack_tokens: int | None) -> int:
    """Tokens per packed micro-batch: ``data.pack_tokens``, or what an unpacked micro-batch holds."""
    return pack_tokens if pack_tokens is not None else micro_batch_size * responses * seq_length


def pair_tokens(example: PreferenceExample, *, share_prompt: bool) -> int:
    """The tokens a pair takes in a packed row (and the non-pad tokens the pivot computes for it)."""
    prompt, responses = len(example["prompt_ids"]), [len(example[f"{name}_ids"]) for name in responses_of(example)]
    if share_prompt:
        return prompt - 1 + sum(1 + response for response in responses)
    return sum(prompt + response for response in responses)


def pack(sizes: list[int], *, budget: int) -> list[list[int]]:
    """Indices of ``sizes`` in bins of at most ``budget`` tokens, first-fit decreasing (ties in index order); each bin
    lists its indices in increasing order."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[index] > budget:
            raise ValueError(f"a pair of {sizes[index]} tokens exceeds the packing budget of {budget} tokens")
        target = next((b for b, load in enumerate(loads) if load + sizes[index] <= budget), None)
        if target is None:
            bins.append([])
            loads.append(0)
            target = len(bins) - 1
        bins[target].append(index)
        loads[target] += sizes[index]
    return [sorted(members) for members in bins]


def split_to(bins: list[list[int]], *, sizes: list[int], count: int) -> list[list[int]]:
    """``bins`` made exactly ``count`` by splitting the fullest bin of two or more pairs in two, largest pairs dealt
    alternately, until there are as many; splitting never exceeds a budget."""
    if count < len(bins) or count > len(sizes):
        raise ValueError(f"cannot split {len(bins)} bins of {len(sizes)} pairs into {count}")
    bins = [list(members) for members in bins]
    while len(bins) < count:
        fullest = max((b for b in range(len(bins)) if len(bins[b]) > 1), key=lambda b: sum(sizes[i] for i in bins[b]))
        members = sorted(bins[fullest], key=lambda i: -sizes[i])
        halves = [[], []]
        for index in members:  # to the lighter half
            halves[sum(sizes[i] for i in halves[0]) > sum(sizes[i] for i in halves[1])].append(index)
        bins[fullest:fullest + 1] = [sorted(halves[0]), sorted(halves[1])]
    return bins


def balance(bins: list[list[int]], *, sizes: list[int], budget: int) -> list[list[int]]:
    """As many bins with loads as even as longest-processing-time first makes them (each pair, largest first, into
    the least loaded bin; ties to the lower index), where that keeps every bin within ``budget`` and the fullest no
    fuller than in ``bins``; else ``bins`` unchanged."""
    balanced: list[list[int]] = [[] for _ in bins]
    loads = [0] * len(bins)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        target = loads.index(min(loads))
        balanced[target].append(index)
        loads[target] += sizes[index]
    fullest = max(sum(sizes[i] for i in members) for members in bins)
    if max(loads) > min(budget, fullest) or not all(balanced):
        return bins
    return [sorted(members) for members in balanced]


def packed_length(bins: list[list[int]], *, sizes: list[int], budget: int) -> int:
    """The row length of a step's packed micro-batches: its longest one, rounded up to ``ALIGN``, within the budget."""
    longest = max(sum(sizes[i] for i in members) for members in bins)
    return min(-(-longest // ALIGN) * ALIGN, budget)


def collate_packed(examples: list[PreferenceExample], *, length: int, pad_id: int,
                   share_prompt: bool) -> PreferenceBatch:
    """B examples packed into one row of ``length`` tokens (see the module docstring); besides ``PreferenceBatch``'s
    keys, all ``[1, length]`` here (``position_ids`` restart per sequence):

        response_slots  [1, L] int64  the unpacked sequence (g * B + b) of each response label, -1 elsewhere
        branches        [1, L] int64  0: a document's shared part (a whole sequence unshared), k: response branch k
        documents       [D + 1] int32 cumulative document lengths, cu_seqlens (the pad tail after them is none)
    """
    responses = {responses_of(e) for e in examples}
    if len(responses) != 1:
        raise ValueError(f"the examples of a batch carry different responses: {sorted(responses)}")
    (names,) = responses
    count = len(examples)
    tokens, labels, positions, slots, branches, documents = [], [], [], [], [], [0]

    def add(ids: list[int], *, start: int, branch: int, slot: int | None, answer: int) -> None:
        """A run of tokens at positions ``start..``; the last ``answer`` labels belong to response ``slot``."""
        if not ids:
            return
        tokens.extend(ids)
        labels.extend(ids[1:] + [pad_id])
        positions.extend(range(start, start + len(ids)))
        branches.extend([branch] * len(ids))
        slots.extend([-1] * (len(ids) - answer - 1) + [slot] * answer + [-1] if answer else [-1] * len(ids))

    for b, example in enumerate(examples):
        prompt = example["prompt_ids"]
        if not prompt or any(not example[f"{name}_ids"] for name in names):
            raise ValueError(f"example {b}: empty prompt or response")
        if share_prompt:
            add(prompt[:-1], start=0, branch=0, slot=None, answer=0)
            if prompt[:-1]:
                labels[-1] = prompt[-1]
            for g, name in enumerate(names):
                response = example[f"{name}_ids"]
                add(prompt[-1:] + response, start=len(prompt) - 1, branch=g + 1, slot=g * count + b,
                    answer=len(response))
            documents.append(len(tokens))
        else:
            for g, name in enumerate(names):
                response = example[f"{name}_ids"]
                add(prompt + response, start=0, branch=0, slot=g * count + b, answer=len(response))
                documents.append(len(tokens))
    used = len(tokens)
    if used > length:
        raise ValueError(f"{count} pairs take {used} tokens, more than the packed length {length}")
    add([pad_id] * (length - used), start=0, branch=0, slot=None, answer=0)
    slots_tensor = torch.tensor([slots], dtype=torch.int64)
    return PreferenceBatch(
        tokens=torch.tensor([tokens], dtype=torch.int64), labels=torch.tensor([labels], dtype=torch.int64),
        loss_mask=(slots_tensor >= 0).float(), position_ids=torch.tensor([positions], dtype=torch.int64),
        row_ids=torch.tensor([e["row_id"] for e in examples], dtype=torch.int64), response_slots=slots_tensor,
        branches=torch.tensor([branches], dtype=torch.int64), documents=torch.tensor(documents, dtype=torch.int32))


def resolve_packing(*, packing: bool | None, share_prompt: bool | None, thd_attention: bool,
                    sliding_window: int | None) -> tuple[bool, bool, str]:
    """(pack, share the prompt, a note for the log or '') for ``data.packing`` / ``data.share_prompt`` (null: on
    where the attention is ``attention.py``'s; off on Transformer Engine's, whose THD path has not run here).
    Raises ConfigError for what the THD path cannot do (a shared prompt) or has not been checked with (windows)."""
    from infifpo_mcore.config import ConfigError

    if not thd_attention:
        pack = packing is not False
        return pack, pack and share_prompt is not False, ""
    if not packing:
        note = ("data.packing null: Transformer Engine's packed (THD) attention has not been verified yet, so "
                "micro-batches stay padded; data.packing=true uses it" if packing is None else "")
        return False, False, note
    problems = []
    if share_prompt:
        problems.append("data.share_prompt: Transformer Engine's packed (THD) attention cannot keep responses of "
                        "one pair apart; use data.share_prompt=false (or null)")
    if sliding_window is not None:
        problems.append("data.packing: packed sequences with sliding-window attention on Transformer Engine's THD "
                        "path are not verified; use data.packing=false")
    if problems:
        raise ConfigError(problems)
    return True, False, ("data.packing=true on Transformer Engine: Megatron's THD path, not yet run on a GPU with "
                         "TE here; compare a few steps with data.packing=false before relying on it")


def packed_micro_batches(examples: list[PreferenceExample], *, budget: int, share_prompt: bool, pad_id: int,
                         data_group, device: torch.device, count_multiple: int = 1) -> list[PreferenceBatch]:
    """This rank's pairs of a step (or an evaluation pass) as packed micro-batches, as many as on the data-parallel
    rank that needs the most (one all-reduce over ``data_group``), rounded up to a multiple of ``count_multiple``
    (the interleaved schedule's groups of PP; the caller gives every rank at least that many pairs); see the module
    docstring. The batches stay on the CPU (the caller moves them)."""
    sizes = [pair_tokens(example, share_prompt=share_prompt) for example in examples]
    bins = pack(sizes, budget=budget)
    count = torch.tensor([len(bins)], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=data_group)
    count = -(-int(count.item()) // count_multiple) * count_multiple
    bins = balance(split_to(bins, sizes=sizes, count=count), sizes=sizes, budget=budget)
    length = packed_length(bins, sizes=sizes, budget=budget)
    return [collate_packed([examples[i] for i in members], length=length, pad_id=pad_id, share_prompt=share_prompt)
            for members in bins]


def shared_prompt_rows(pairs: list[tuple[list[int], list[int], list[int]]], *, pad_id: int,
                       length_multiple: int = 1) -> dict[str, torch.Tensor | int]:
    """Source scoring's shared prompt: B (prompt, chosen, rejected) id lists as left-padded rows
    ``[prompt, chosen, last prompt token, rejected]`` for a causal LM given a custom mask (the branch layout of the
    module docstring, prompt and chosen together as the first branch continues the prompt).

        input_ids     [B, T] int64     T = the longest row, rounded up to ``length_multiple``
        position_ids  [B, T] int64     the rejected branch continues from the prompt's end, as the chosen one does
        allowed       [B, T, T] bool   query t may attend to key s (causal, no padding, branches apart)
        keep          int              K: the logits needed, those of the last K positions
        chosen, rejected [B, K-1] bool which of the last K-1 predictions (of the next token) are response tokens
    """
    length = max(len(prompt) + len(chosen) + 1 + len(rejected) for prompt, chosen, rejected in pairs)
    length = -(-length // length_multiple) * length_multiple
    keep = max(len(chosen) + len(rejected) + 2 for _, chosen, rejected in pairs)
    count = len(pairs)
    input_ids = torch.full((count, length), pad_id, dtype=torch.int64)
    position_ids = torch.zeros((count, length), dtype=torch.int64)
    branch = torch.full((count, length), -1, dtype=torch.int64)  # -1: padding, 0: prompt, 1: chosen, 2: rejected
    chosen_mask = torch.zeros((count, length), dtype=torch.bool)  # at the positions that predict a chosen token
    rejected_mask = torch.zeros((count, length), dtype=torch.bool)
    for row, (prompt, chosen, rejected) in enumerate(pairs):
        ids = prompt + chosen + prompt[-1:] + rejected
        start = length - len(ids)
        input_ids[row, start:] = torch.tensor(ids)
        prompt_end, rejected_start = start + len(prompt), start + len(prompt) + len(chosen)
        position_ids[row, start:rejected_start] = torch.arange(len(prompt) + len(chosen))
        position_ids[row, rejected_start:] = torch.arange(len(prompt) - 1, len(prompt) + len(rejected))
        branch[row, start:prompt_end - 1] = 0
        branch[row, prompt_end - 1:rejected_start] = 1
        branch[row, rejected_start:] = 2
        chosen_mask[row, prompt_end - 1:rejected_start - 1] = True
        rejected_mask[row, rejected_start:length - 1] = True
    keys, queries = branch[:, None, :], branch[:, :, None]
    allowed = (torch.ones(length, length, dtype=torch.bool).tril() & (keys >= 0)
               & ((keys == 0) | (keys == queries)))
    return {"input_ids": input_ids, "position_ids": position_ids, "allowed": allowed, "keep": keep,
            "chosen": chosen_mask[:, length - keep:length - 1], "rejected": rejected_mask[:, length - keep:length - 1]}
