"""Preference losses as pure tensor functions: InfiFPO, FPO, DPO and IPO.

Every loss takes sequence-level scores (already summed over response tokens) and returns a per-row loss ``[B]`` and
per-row metrics ``{name: [B]}``; the caller averages over rows, micro-batches and data-parallel ranks.

Notation, for one row (prompt x, chosen y_w, rejected y_l): pi is the pivot being trained, pi_0 the frozen pivot
init, S_1..S_N the source models. For a model M, l_M(y) = sum_t log M(y_t | x, y_<t) is the sequence log-prob in M's
own tokens and |y|_M the number of those tokens.

Length normalisation (``length_norm``) puts models with different tokenizers on one per-token scale:

    s_M(y) = l_M(y) / |y|_M      if length_norm        else      s_M(y) = l_M(y)

pi and pi_0 divide by the pivot token counts, S_i by its own token counts.

Probability clipping (``clip``), applied to the normalised scores so that sources with different tokenizers are
compared per token, never as raw sums:

    c_i = max(s_{S_i}(y_w), s_{pi_0}(y_w))        r_i = min(s_{S_i}(y_l), s_{pi_0}(y_l))

A source may say y_w is likelier or y_l less likely than the pivot init did, never the reverse, so a weak source
cannot pull the pivot away from the preference. Without clip, c_i = s_{S_i}(y_w) and r_i = s_{S_i}(y_l).
``fusion/clip_rate_{chosen,rejected}`` is the fraction of the N sources clipped in a row (0 when clip is off).

Candidates k = 1..K are the N sources, plus pi_0 as one more (K = N + 1, c = s_{pi_0}(y_w), r = s_{pi_0}(y_l))
when ``include_pivot_init``. Fusion is the log of the paper's weighted product of clipped source probabilities:

    F(y_w) = sum_k gamma_k c_k          F(y_l) = sum_k gamma_k r_k
    mean:        gamma_k = 1 / K
    sum:         gamma_k = 1
    max_margin:  gamma_k = 1[k = k*],   k* = argmax_k | (c_k - r_k) - (s_{pi_0}(y_w) - s_{pi_0}(y_l)) |

max_margin keeps, per row, the candidate whose preference margin differs most (in absolute value) from the pivot
init's margin: the source that would teach the pivot the most. Ties go to the lowest source index; the pivot init,
whose own distance is 0, is picked only when no source differs from it at all. ``fusion/picked_source_{i}`` is 1.0
where candidate i was picked (i = N is the pivot init). Two consequences: with clip on, every c_k - r_k is at least
the init margin, so max_margin keeps the largest margin; and since the loss sees F only through F(y_w) - F(y_l),
include_pivot_init changes the max_margin loss never, only the picked_source metrics.

Loss, with h the implicit-reward margin against the reference F:

    h = (s_pi(y_w) - F(y_w)) - (s_pi(y_l) - F(y_l))
    infifpo, fpo, dpo:   L = -log sigmoid(beta * h)
    ipo:                 L = (h - 1 / (2 * tau))^2,    tau = ipo_tau, or beta when ipo_tau is None

* infifpo: F as above with every strategy switchable.
* fpo: the fused reference without strategies: length_norm, clip and include_pivot_init off, mean fusion, whatever
  the flags say.
* dpo, ipo: F = s_{pi_0} (the pivot init is the reference); length_norm is honoured, clip and fusion do not apply.

Metrics: ``rewards/chosen`` = beta (s_pi(y_w) - F(y_w)), ``rewards/rejected`` likewise, ``rewards/margins`` their
difference, ``rewards/accuracies`` 1.0 where chosen > rejected, ``logps/chosen`` and ``logps/rejected`` = s_pi as used.

Sources and choices. InfiFPO: Gu et al., arXiv 2505.13878, Eq. 13, which fuses Clip(S_i(y|x))^gamma_i
multiplicatively and takes length-normalised logs of the ratio. The authors' public repository (InfiXAI/InfiFPO,
checked at commit 69ff57f) ships only README.md, run.sh and run-slurm.sh, not the trainer, so the order of clipping
and normalisation could not be read from code; we normalise first, as argued above. Its run.sh switches
``--length_norm`` independently of ``--fuse`` (DPO with and without normalisation), which is why dpo/ipo honour
length_norm here. Its ``--ref_offset`` flag (5.0 with length norm, 300 without) has no counterpart in Eq. 13 and
is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor


class PreferenceLogps(TypedDict, total=False):
    policy_chosen_logps: Tensor  # [B] sum of pivot log-probs of y_w
    policy_rejected_logps: Tensor  # [B]
    policy_chosen_lengths: Tensor  # [B] pivot-token counts (float or int)
    policy_rejected_lengths: Tensor  # [B]
    init_chosen_logps: Tensor  # [B] sums under the pivot init (pivot tokens, same lengths as policy)
    init_rejected_logps: Tensor  # [B]
    source_chosen_logps: Tensor  # [B, N] sums under each source, in the source's own tokens
    source_rejected_logps: Tensor  # [B, N]
    source_chosen_lengths: Tensor  # [B, N] each source's own token counts
    source_rejected_lengths: Tensor  # [B, N]


FUSION_STRATEGIES = ("mean", "sum", "max_margin")


@dataclass(frozen=True)
class LossOptions:
    """The LossConfig fields a loss reads, bundled so every entry of LOSS_FUNCTIONS has one signature."""

    beta: float
    length_norm: bool
    clip: bool
    fusion: str
    include_pivot_init: bool
    ipo_tau: float | None = None


LossFunction = Callable[[PreferenceLogps, LossOptions], tuple[Tensor, dict[str, Tensor]]]
MarginLoss = Callable[[Tensor], Tensor]  # per-row loss [B] of the margin h [B]


def _keys(model: str, suffix: str) -> tuple[str, str]:
    return f"{model}_chosen_{suffix}", f"{model}_rejected_{suffix}"


def _require(logps: PreferenceLogps, keys: tuple[str, ...], *, loss_type: str, because: str = "") -> None:
    missing = [key for key in keys if key not in logps]
    if missing:
        reason = f" (because {because})" if because else ""
        raise ValueError(
            f"loss type {loss_type!r} needs {', '.join(missing)} in logps{reason}; present: {sorted(logps)}"
        )


def _check_shapes(logps: PreferenceLogps) -> None:
    """Row keys must be [B], source keys [B, N], with one B and one N >= 1 across all present keys."""
    batch_sizes, source_counts = {}, {}
    for key in PreferenceLogps.__annotations__:
        if key not in logps:
            continue
        shape = tuple(logps[key].shape)
        is_source = key.startswith("source_")
        if len(shape) != (2 if is_source else 1):
            raise ValueError(f"logps[{key!r}] must have shape {'[B, N]' if is_source else '[B]'}, got {shape}")
        batch_sizes[key] = shape[0]
        if is_source:
            source_counts[key] = shape[1]
    if len(set(batch_sizes.values())) > 1:
        raise ValueError(f"logps disagree on the number of rows B: {batch_sizes}")
    if len(set(source_counts.values())) > 1:
        raise ValueError(f"logps disagree on the number of sources N: {source_counts}")
    if 0 in source_counts.values():
        raise ValueError(f"source scores need at least one source (N >= 1): {source_counts}")


def _scores(
    logps: PreferenceLogps, model: str, *, lengths_of: str, length_norm: bool, like: Tensor
) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) scores of ``model`` in ``like``'s dtype and device; divided by the token counts of
    ``lengths_of`` when length_norm. The caller has checked the keys with ``_require``."""
    chosen_key, rejected_key = _keys(model, "logps")
    chosen, rejected = logps[chosen_key].to(like), logps[rejected_key].to(like)
    if length_norm:
        chosen_lengths, rejected_lengths = _keys(lengths_of, "lengths")
        chosen, rejected = chosen / logps[chosen_lengths].to(like), rejected / logps[rejected_lengths].to(like)
    return chosen, rejected


def _policy_scores(logps: PreferenceLogps, options: LossOptions, loss_type: str) -> tuple[Tensor, Tensor]:
    _require(logps, _keys("policy", "logps"), loss_type=loss_type)
    if options.length_norm:
        _require(logps, _keys("policy", "lengths"), loss_type=loss_type, because="length_norm=True")
    like = logps["policy_chosen_logps"]
    return _scores(logps, "policy", lengths_of="policy", length_norm=options.length_norm, like=like)


def _init_scores(
    logps: PreferenceLogps, options: LossOptions, *, loss_type: str, because: str, like: Tensor
) -> tuple[Tensor, Tensor]:
    _require(logps, _keys("init", "logps"), loss_type=loss_type, because=because)
    # The pivot init is scored in pivot tokens, so it shares the policy's lengths.
    return _scores(logps, "init", lengths_of="policy", length_norm=options.length_norm, like=like)


def _fuse(
    chosen: Tensor, rejected: Tensor, *, fusion: str, init_margin: Tensor | None, init_is_last: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fuse candidate scores [B, K] into [B]; also returns the picked candidate [B] for max_margin, else None."""
    if fusion == "mean":
        return chosen.mean(dim=-1), rejected.mean(dim=-1), None
    if fusion == "sum":
        return chosen.sum(dim=-1), rejected.sum(dim=-1), None
    distance = ((chosen - rejected) - init_margin[:, None]).abs()
    picked = distance.argmax(dim=-1)  # first maximum: lowest index on ties
    if init_is_last:
        # The init's own distance is exactly 0, so it can only tie; report it when no source differs from it.
        no_source_differs = distance[:, :-1].amax(dim=-1) == 0
        picked = torch.where(no_source_differs, torch.full_like(picked, distance.shape[-1] - 1), picked)
    index = picked[:, None]
    return chosen.gather(-1, index).squeeze(-1), rejected.gather(-1, index).squeeze(-1), picked


def _fused_reference(
    logps: PreferenceLogps, options: LossOptions, *, loss_type: str, like: Tensor
) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
    """The fused reference (F(y_w), F(y_l)), each [B], and the fusion/* metrics."""
    _require(logps, _keys("source", "logps"), loss_type=loss_type)
    if options.length_norm:
        _require(logps, _keys("source", "lengths"), loss_type=loss_type, because="length_norm=True")
    chosen, rejected = _scores(logps, "source", lengths_of="source", length_norm=options.length_norm, like=like)
    init_needed_by = {
        "clip=True": options.clip,
        "include_pivot_init=True": options.include_pivot_init,
        "fusion='max_margin'": options.fusion == "max_margin",
    }
    init_chosen = init_rejected = init_margin = None
    if any(init_needed_by.values()):
        because = ", ".join(flag for flag, needed in init_needed_by.items() if needed)
        init_chosen, init_rejected = _init_scores(logps, options, loss_type=loss_type, because=because, like=like)
        init_margin = init_chosen - init_rejected  # [B]
        init_chosen, init_rejected = init_chosen[:, None], init_rejected[:, None]  # [B, 1], against [B, N]

    clipped_chosen = torch.zeros_like(chosen, dtype=torch.bool)
    clipped_rejected = torch.zeros_like(rejected, dtype=torch.bool)
    if options.clip:
        clipped_chosen, clipped_rejected = chosen < init_chosen, rejected > init_rejected
        chosen, rejected = torch.maximum(chosen, init_chosen), torch.minimum(rejected, init_rejected)
    metrics = {
        "fusion/clip_rate_chosen": clipped_chosen.to(like).mean(dim=-1),
        "fusion/clip_rate_rejected": clipped_rejected.to(like).mean(dim=-1),
    }
    if options.include_pivot_init:
        chosen, rejected = torch.cat([chosen, init_chosen], dim=-1), torch.cat([rejected, init_rejected], dim=-1)

    fused_chosen, fused_rejected, picked = _fuse(
        chosen, rejected, fusion=options.fusion, init_margin=init_margin, init_is_last=options.include_pivot_init
    )
    if picked is not None:
        for candidate in range(chosen.shape[-1]):
            metrics[f"fusion/picked_source_{candidate}"] = (picked == candidate).to(like)
    return (fused_chosen, fused_rejected), metrics


def _loss_and_metrics(
    policy: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor], *, beta: float, loss_of_margin: MarginLoss
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss [B] of the margin h and the rewards/* and logps/* metrics, from (chosen, rejected) scores [B]."""
    (policy_chosen, policy_rejected), (reference_chosen, reference_rejected) = policy, reference
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    loss = loss_of_margin(chosen_logratio - rejected_logratio)
    chosen_reward = beta * chosen_logratio.detach()
    rejected_reward = beta * rejected_logratio.detach()
    return loss, {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).to(chosen_reward),
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }


def _sigmoid_loss(beta: float) -> MarginLoss:
    return lambda margin: -F.logsigmoid(beta * margin)


def _fused_reference_loss(
    logps: PreferenceLogps, options: LossOptions, *, loss_type: str
) -> tuple[Tensor, dict[str, Tensor]]:
    policy = _policy_scores(logps, options, loss_type)
    reference, fusion_metrics = _fused_reference(logps, options, loss_type=loss_type, like=policy[0])
    loss, metrics = _loss_and_metrics(policy, reference, beta=options.beta, loss_of_margin=_sigmoid_loss(options.beta))
    return loss, metrics | fusion_metrics


def _init_reference_loss(
    logps: PreferenceLogps, options: LossOptions, *, loss_type: str, loss_of_margin: MarginLoss
) -> tuple[Tensor, dict[str, Tensor]]:
    policy = _policy_scores(logps, options, loss_type)
    reference = _init_scores(
        logps, options, loss_type=loss_type, because="the pivot init is the reference", like=policy[0]
    )
    return _loss_and_metrics(policy, reference, beta=options.beta, loss_of_margin=loss_of_margin)


def infifpo_loss(logps: PreferenceLogps, options: LossOptions) -> tuple[Tensor, dict[str, Tensor]]:
    return _fused_reference_loss(logps, options, loss_type="infifpo")


def fpo_loss(logps: PreferenceLogps, options: LossOptions) -> tuple[Tensor, dict[str, Tensor]]:
    plain = replace(options, length_norm=False, clip=False, fusion="mean", include_pivot_init=False)
    return _fused_reference_loss(logps, plain, loss_type="fpo")


def dpo_loss(logps: PreferenceLogps, options: LossOptions) -> tuple[Tensor, dict[str, Tensor]]:
    return _init_reference_loss(logps, options, loss_type="dpo", loss_of_margin=_sigmoid_loss(options.beta))


def ipo_loss(logps: PreferenceLogps, options: LossOptions) -> tuple[Tensor, dict[str, Tensor]]:
    tau = options.beta if options.ipo_tau is None else options.ipo_tau
    return _init_reference_loss(
        logps, options, loss_type="ipo", loss_of_margin=lambda margin: (margin - 1 / (2 * tau)) ** 2
    )


LOSS_FUNCTIONS: dict[str, LossFunction] = {
    "infifpo": infifpo_loss,
    "fpo": fpo_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
}


def compute_loss(
    *,
    loss_type: str,
    logps: PreferenceLogps,
    beta: float,
    length_norm: bool,
    clip: bool,
    fusion: str,
    include_pivot_init: bool,
    ipo_tau: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-row loss [B] and metrics {name: [B]} for ``loss_type``; see the module docstring for the math.

    Raises ValueError for an unknown loss type or fusion, a key the configuration needs but ``logps`` lacks
    (naming the key and the loss type), inconsistent shapes, or a non-positive beta / ipo_tau.
    """
    if loss_type not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {sorted(LOSS_FUNCTIONS)}")
    if fusion not in FUSION_STRATEGIES:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {list(FUSION_STRATEGIES)}")
    if beta <= 0 or (ipo_tau is not None and ipo_tau <= 0):
        raise ValueError(f"beta and ipo_tau must be > 0, got beta={beta}, ipo_tau={ipo_tau}")
    _check_shapes(logps)
    options = LossOptions(
        beta=beta,
        length_norm=length_norm,
        clip=clip,
        fusion=fusion,
        include_pivot_init=include_pivot_init,
        ipo_tau=ipo_tau,
    )
    return LOSS_FUNCTIONS[loss_type](logps, options)
