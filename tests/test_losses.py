"""Tests for infifpo_mcore.losses against a per-row hand computation of the InfiFPO / DPO / IPO / WRPO formulas."""

import itertools
import math
import random

import pytest
import torch

from infifpo_mcore.losses import FUSION_STRATEGIES, LOSSES, LossOptions, compute_loss, wrpo_alpha

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
POLICY_METRICS = ("logps/chosen", "logps/rejected")


def random_rows(*, seed: int, num_rows: int = 8, num_sources: int = 3) -> list[dict]:
    """Rows of plain floats: per-token log-probs in overlapping ranges so that some sources get clipped."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        pivot_w, pivot_l = rng.randint(3, 40), rng.randint(3, 40)
        source_w = [rng.randint(3, 40) for _ in range(num_sources)]
        source_l = [rng.randint(3, 40) for _ in range(num_sources)]
        rows.append({
            "pivot_len_w": pivot_w,
            "pivot_len_l": pivot_l,
            "policy_w": rng.uniform(-2.0, -0.2) * pivot_w,
            "policy_l": rng.uniform(-2.0, -0.2) * pivot_l,
            "init_w": rng.uniform(-2.0, -0.2) * pivot_w,
            "init_l": rng.uniform(-2.0, -0.2) * pivot_l,
            "source_len_w": source_w,
            "source_len_l": source_l,
            "source_w": [rng.uniform(-2.0, -0.2) * n for n in source_w],
            "source_l": [rng.uniform(-2.0, -0.2) * n for n in source_l],
        })
    return rows


def to_logps(rows: list[dict]) -> dict[str, torch.Tensor]:
    def column(name):
        return torch.tensor([row[name] for row in rows], dtype=torch.float64)

    return {
        "policy_chosen_logps": column("policy_w"),
        "policy_rejected_logps": column("policy_l"),
        "policy_chosen_lengths": column("pivot_len_w"),
        "policy_rejected_lengths": column("pivot_len_l"),
        "init_chosen_logps": column("init_w"),
        "init_rejected_logps": column("init_l"),
        "source_chosen_logps": column("source_w"),
        "source_rejected_logps": column("source_l"),
        "source_chosen_lengths": column("source_len_w"),
        "source_rejected_lengths": column("source_len_l"),
    }


def expected_row(row, *, loss_type, beta, length_norm, clip=False, fusion="mean", include_pivot_init=False,
                 ipo_tau=None) -> dict[str, float]:
    """The paper's formulas for one row, written with plain floats."""
    if loss_type == "fpo":
        length_norm, clip, fusion, include_pivot_init = False, False, "mean", False

    def norm(total, length):
        return total / length if length_norm else total

    pi_w, pi_l = norm(row["policy_w"], row["pivot_len_w"]), norm(row["policy_l"], row["pivot_len_l"])
    init_w, init_l = norm(row["init_w"], row["pivot_len_w"]), norm(row["init_l"], row["pivot_len_l"])
    expected = {}
    if loss_type in ("dpo", "ipo"):
        ref_w, ref_l = init_w, init_l
    else:
        # confidence: each candidate's mean log-prob per token of y_w, before clipping, whatever length_norm says
        confidence = [s / n for s, n in zip(row["source_w"], row["source_len_w"])]
        if include_pivot_init:
            confidence.append(row["init_w"] / row["pivot_len_w"])
        cand_w = [norm(s, n) for s, n in zip(row["source_w"], row["source_len_w"])]
        cand_l = [norm(s, n) for s, n in zip(row["source_l"], row["source_len_l"])]
        num_sources = len(cand_w)
        if clip:
            expected["fusion/clip_rate_chosen"] = sum(c < init_w for c in cand_w) / num_sources
            expected["fusion/clip_rate_rejected"] = sum(c > init_l for c in cand_l) / num_sources
            cand_w = [max(c, init_w) for c in cand_w]
            cand_l = [min(c, init_l) for c in cand_l]
        else:
            expected["fusion/clip_rate_chosen"] = expected["fusion/clip_rate_rejected"] = 0.0
        if include_pivot_init:
            cand_w, cand_l = cand_w + [init_w], cand_l + [init_l]
        if fusion == "mean":
            ref_w, ref_l = sum(cand_w) / len(cand_w), sum(cand_l) / len(cand_l)
        elif fusion == "sum":
            ref_w, ref_l = sum(cand_w), sum(cand_l)
        elif fusion == "confidence":
            weights = [math.exp(m) / sum(math.exp(other) for other in confidence) for m in confidence]
            ref_w = sum(g * c for g, c in zip(weights, cand_w))
            ref_l = sum(g * c for g, c in zip(weights, cand_l))
            expected.update({f"fusion/weight_{k}": g for k, g in enumerate(weights)})
        else:
            distances = [abs((w - l) - (init_w - init_l)) for w, l in zip(cand_w, cand_l)]
            picked = distances.index(max(distances))
            if include_pivot_init and max(distances[:num_sources]) == 0:
                picked = num_sources
            ref_w, ref_l = cand_w[picked], cand_l[picked]
            for k in range(len(cand_w)):
                expected[f"fusion/picked_source_{k}"] = float(k == picked)

    h = (pi_w - ref_w) - (pi_l - ref_l)
    if loss_type in ("ipo", "infifpo_ipo"):
        tau = beta if ipo_tau is None else ipo_tau
        expected["loss"] = (h - 1 / (2 * tau)) ** 2
    else:
        expected["loss"] = -math.log(1 / (1 + math.exp(-beta * h)))
    chosen_reward, rejected_reward = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
    expected.update({
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": float(chosen_reward > rejected_reward),
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": pi_w,
        "logps/rejected": pi_l,
    })
    return expected


def assert_matches_hand_computation(rows, *, loss_type, **settings):
    loss, metrics = compute_loss(loss_type=loss_type, logps=to_logps(rows), **settings)
    expected = [expected_row(row, loss_type=loss_type, **settings) for row in rows]
    assert set(metrics) == set(expected[0]) - {"loss"}
    assert loss.shape == (len(rows),)
    assert loss.tolist() == pytest.approx([e["loss"] for e in expected], rel=1e-12, abs=1e-12)
    for name, values in metrics.items():
        assert values.shape == (len(rows),), name
        assert values.tolist() == pytest.approx([e[name] for e in expected], rel=1e-12, abs=1e-12), name


STRATEGIES = list(itertools.product([False, True], [False, True], FUSION_STRATEGIES, [False, True]))


def strategy_id(strategy) -> str:
    length_norm, clip, fusion, include = strategy
    return f"{'ln' if length_norm else 'raw'}-{'clip' if clip else 'noclip'}-{fusion}-{'init' if include else 'noinit'}"


def test_random_rows_exercise_clipping_both_ways():
    # The hand-computation tests only mean something if the data clips some sources and not others.
    rows = random_rows(seed=0)
    for length_norm in (False, True):
        metrics = compute_loss(loss_type="infifpo", logps=to_logps(rows), beta=0.1, length_norm=length_norm,
                               clip=True, fusion="mean", include_pivot_init=False)[1]
        for side in ("chosen", "rejected"):
            rates = metrics[f"fusion/clip_rate_{side}"]
            assert 0 < rates.mean() < 1


@pytest.mark.parametrize("strategy", STRATEGIES, ids=strategy_id)
def test_infifpo_matches_hand_computation(strategy):
    length_norm, clip, fusion, include_pivot_init = strategy
    assert_matches_hand_computation(random_rows(seed=1), loss_type="infifpo", beta=0.7, length_norm=length_norm,
                                    clip=clip, fusion=fusion, include_pivot_init=include_pivot_init)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=strategy_id)
def test_fpo_ignores_strategy_flags_and_matches_hand_computation(strategy):
    length_norm, clip, fusion, include_pivot_init = strategy
    assert_matches_hand_computation(random_rows(seed=2), loss_type="fpo", beta=0.05, length_norm=length_norm,
                                    clip=clip, fusion=fusion, include_pivot_init=include_pivot_init)


@pytest.mark.parametrize("length_norm", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_dpo_matches_hand_computation(length_norm, clip):
    assert_matches_hand_computation(random_rows(seed=3), loss_type="dpo", beta=0.3, length_norm=length_norm,
                                    clip=clip, fusion="max_margin", include_pivot_init=True)


@pytest.mark.parametrize("length_norm", [False, True])
@pytest.mark.parametrize("ipo_tau", [None, 0.5])
def test_ipo_matches_hand_computation(length_norm, ipo_tau):
    assert_matches_hand_computation(random_rows(seed=4), loss_type="ipo", beta=0.2, length_norm=length_norm,
                                    clip=False, fusion="mean", include_pivot_init=False, ipo_tau=ipo_tau)


def test_ipo_tau_changes_the_target_margin():
    logps = to_logps(random_rows(seed=5))
    common = dict(loss_type="ipo", logps=logps, beta=0.2, length_norm=False, clip=False, fusion="mean",
                  include_pivot_init=False)
    assert not torch.allclose(compute_loss(**common)[0], compute_loss(**common, ipo_tau=0.5)[0])


def test_fpo_with_one_source_equal_to_pivot_init_is_exactly_dpo():
    logps = to_logps(random_rows(seed=6, num_sources=1))
    logps["source_chosen_logps"] = logps["init_chosen_logps"][:, None].clone()
    logps["source_rejected_logps"] = logps["init_rejected_logps"][:, None].clone()
    common = dict(logps=logps, beta=0.1, length_norm=False, clip=True, fusion="sum", include_pivot_init=True)
    fpo_loss, fpo_metrics = compute_loss(loss_type="fpo", **common)
    dpo_loss, dpo_metrics = compute_loss(loss_type="dpo", **common)
    assert torch.equal(fpo_loss, dpo_loss)
    for name in REWARD_METRICS + POLICY_METRICS:
        assert torch.equal(fpo_metrics[name], dpo_metrics[name]), name


def test_infifpo_without_strategies_is_exactly_fpo():
    logps = to_logps(random_rows(seed=7))
    plain = dict(logps=logps, beta=0.1, length_norm=False, clip=False, fusion="mean", include_pivot_init=False)
    infifpo_loss, infifpo_metrics = compute_loss(loss_type="infifpo", **plain)
    fpo_loss, fpo_metrics = compute_loss(loss_type="fpo", **(plain | dict(length_norm=True, clip=True)))
    assert torch.equal(infifpo_loss, fpo_loss)
    assert infifpo_metrics.keys() == fpo_metrics.keys()
    assert all(torch.equal(infifpo_metrics[name], fpo_metrics[name]) for name in infifpo_metrics)


def constructed_logps(*, init_w, init_l, source_w, source_l, policy_w=None, policy_l=None):
    """Raw sums (length_norm off) for hand-built rows; policy defaults to the init."""
    init_w, init_l = torch.tensor(init_w, dtype=torch.float64), torch.tensor(init_l, dtype=torch.float64)
    return {
        "policy_chosen_logps": init_w.clone() if policy_w is None else torch.tensor(policy_w, dtype=torch.float64),
        "policy_rejected_logps": init_l.clone() if policy_l is None else torch.tensor(policy_l, dtype=torch.float64),
        "init_chosen_logps": init_w,
        "init_rejected_logps": init_l,
        "source_chosen_logps": torch.tensor(source_w, dtype=torch.float64),
        "source_rejected_logps": torch.tensor(source_l, dtype=torch.float64),
    }


def test_max_margin_picks_the_source_whose_margin_differs_most_from_the_init():
    # Init margin: row 0: 0, row 1: -10 - (-12) = 2.  Source margins: row 0: 1, -5, 2 -> |.-0| largest for
    # source 1 (a negative margin counts by its size); row 1: 3, 2.5, 1.5 -> distances 1, 0.5, 0.5 -> source 0.
    logps = constructed_logps(init_w=[-10.0, -10.0], init_l=[-10.0, -12.0],
                              source_w=[[-9.0, -15.0, -8.0], [-7.0, -9.5, -8.5]],
                              source_l=[[-10.0, -10.0, -10.0], [-10.0, -12.0, -10.0]])
    loss, metrics = compute_loss(loss_type="infifpo", logps=logps, beta=1.0, length_norm=False, clip=False,
                                 fusion="max_margin", include_pivot_init=False)
    assert metrics["fusion/picked_source_0"].tolist() == [0.0, 1.0]
    assert metrics["fusion/picked_source_1"].tolist() == [1.0, 0.0]
    assert metrics["fusion/picked_source_2"].tolist() == [0.0, 0.0]
    assert "fusion/picked_source_3" not in metrics
    # Policy = init, so h = init margin - picked source margin: row 0: 0 - (-5) = 5, row 1: 2 - 3 = -1.
    assert metrics["rewards/margins"].tolist() == pytest.approx([5.0, -1.0])


def test_max_margin_ties_go_to_the_lowest_source_and_to_the_init_only_when_no_source_differs():
    # Row 0: sources 1 and 2 tie at distance 4 -> source 1. Row 1: with clipping every source collapses onto the
    # init (chosen below it, rejected above it), so no source differs -> the pivot init (index N = 3) is picked.
    logps = constructed_logps(init_w=[-10.0, -10.0], init_l=[-10.0, -10.0],
                              source_w=[[-9.0, -6.0, -14.0], [-11.0, -12.0, -13.0]],
                              source_l=[[-10.0, -10.0, -10.0], [-9.0, -8.0, -7.0]])
    for include_pivot_init, clip in ((False, False), (True, True)):
        metrics = compute_loss(loss_type="infifpo", logps=logps, beta=1.0, length_norm=False, clip=clip,
                               fusion="max_margin", include_pivot_init=include_pivot_init)[1]
        assert metrics["fusion/picked_source_1"][0] == 1.0
    assert metrics["fusion/picked_source_3"].tolist() == [0.0, 1.0]
    assert metrics["fusion/clip_rate_chosen"][1] == 1.0 and metrics["fusion/clip_rate_rejected"][1] == 1.0


def test_clip_rates_count_clipped_sources_per_row():
    # Chosen init -1: sources -2 and -3 are below it (clipped), -0.5 is not. Rejected init -2: -1 and -1.5 are
    # above it (clipped), -3 is not. Row 1 has nothing to clip: a source equal to the init is not counted.
    logps = constructed_logps(init_w=[-1.0, -5.0], init_l=[-2.0, -1.0],
                              source_w=[[-2.0, -0.5, -3.0], [-4.0, -5.0, -1.0]],
                              source_l=[[-1.0, -3.0, -1.5], [-1.0, -3.0, -4.0]])
    clipped = compute_loss(loss_type="infifpo", logps=logps, beta=1.0, length_norm=False, clip=True,
                           fusion="mean", include_pivot_init=True)[1]
    assert clipped["fusion/clip_rate_chosen"].tolist() == pytest.approx([2 / 3, 0.0])
    assert clipped["fusion/clip_rate_rejected"].tolist() == pytest.approx([2 / 3, 0.0])
    # Mean over the clipped sources plus the init: chosen (-1 - 0.5 - 1 - 1) / 4, rejected (-2 - 3 - 2 - 2) / 4.
    # Policy = init: rewards are init - F.
    assert clipped["rewards/chosen"][0].item() == pytest.approx(-1.0 - (-3.5 / 4))
    assert clipped["rewards/rejected"][0].item() == pytest.approx(-2.0 - (-9.0 / 4))
    unclipped = compute_loss(loss_type="infifpo", logps=logps, beta=1.0, length_norm=False, clip=False,
                             fusion="mean", include_pivot_init=True)[1]
    assert unclipped["fusion/clip_rate_chosen"].tolist() == [0.0, 0.0]
    assert unclipped["fusion/clip_rate_rejected"].tolist() == [0.0, 0.0]


def test_clipping_compares_length_normalised_scores():
    # Source chosen: -10 over 10 tokens (-1.0 per token); init chosen: -6 over 3 pivot tokens (-2.0 per token).
    # Per token the source is likelier (no clip); as raw sums it is less likely (clip).
    logps = constructed_logps(init_w=[-6.0], init_l=[-6.0], source_w=[[-10.0]], source_l=[[-20.0]])
    logps |= {"policy_chosen_lengths": torch.tensor([3.0]), "policy_rejected_lengths": torch.tensor([3.0]),
              "source_chosen_lengths": torch.tensor([[10.0]]), "source_rejected_lengths": torch.tensor([[10.0]])}
    rates = {length_norm: compute_loss(loss_type="infifpo", logps=logps, beta=1.0, length_norm=length_norm,
                                       clip=True, fusion="mean", include_pivot_init=False)[1]
             for length_norm in (False, True)}
    assert rates[False]["fusion/clip_rate_chosen"].item() == 1.0
    assert rates[True]["fusion/clip_rate_chosen"].item() == 0.0


def test_accuracies_and_margins():
    # DPO, beta 0.5, reference = init = 0. Rewards: row 0: 0.5*-1 vs 0.5*-3 (chosen wins); row 1: -2 vs -1
    # (rejected wins); row 2: a tie, which is not counted as accurate.
    logps = constructed_logps(init_w=[0.0, 0.0, 0.0], init_l=[0.0, 0.0, 0.0], source_w=[[0.0]] * 3,
                              source_l=[[0.0]] * 3, policy_w=[-1.0, -4.0, -2.0], policy_l=[-3.0, -2.0, -2.0])
    loss, metrics = compute_loss(loss_type="dpo", logps=logps, beta=0.5, length_norm=False, clip=False,
                                 fusion="mean", include_pivot_init=False)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]
    assert metrics["rewards/margins"].tolist() == pytest.approx([1.0, -1.0, 0.0])
    assert metrics["logps/chosen"].tolist() == [-1.0, -4.0, -2.0]
    assert loss[2].item() == pytest.approx(math.log(2.0))


def test_gradient_reaches_only_the_policy_and_matches_the_analytic_one():
    logps = to_logps(random_rows(seed=8))
    policy_chosen = logps["policy_chosen_logps"].clone().requires_grad_(True)
    logps["policy_chosen_logps"] = policy_chosen
    beta = 0.4
    loss, metrics = compute_loss(loss_type="dpo", logps=logps, beta=beta, length_norm=False, clip=False,
                                 fusion="mean", include_pivot_init=False)
    loss.sum().backward()
    h = metrics["rewards/margins"] / beta
    # d/dpi_w of -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    torch.testing.assert_close(policy_chosen.grad, -beta * torch.sigmoid(-beta * h))
    assert not any(value.requires_grad for value in metrics.values())


def test_integer_lengths_and_float32_scores_are_accepted():
    logps = {name: value.float() for name, value in to_logps(random_rows(seed=9)).items()}
    for name in ("policy_chosen_lengths", "policy_rejected_lengths", "source_chosen_lengths",
                 "source_rejected_lengths"):
        logps[name] = logps[name].long()
    loss, metrics = compute_loss(loss_type="infifpo", logps=logps, beta=0.1, length_norm=True, clip=True,
                                 fusion="max_margin", include_pivot_init=True)
    assert loss.dtype == torch.float32 and all(value.dtype == torch.float32 for value in metrics.values())
    float_loss = compute_loss(loss_type="infifpo", logps=to_logps(random_rows(seed=9)), beta=0.1, length_norm=True,
                              clip=True, fusion="max_margin", include_pivot_init=True)[0]
    torch.testing.assert_close(loss, float_loss.float())


def test_loss_table_lists_every_loss_type():
    assert set(LOSSES) == {"infifpo", "fpo", "dpo", "ipo", "wrpo", "infifpo_ipo", "infifpo_wrpo", "sft"}


@pytest.mark.parametrize(
    "loss_type, settings, missing, reason",
    [
        ("dpo", {}, "init_chosen_logps", "pivot init is the reference"),
        ("ipo", {"length_norm": True}, "policy_rejected_lengths", "length_norm=True"),
        ("infifpo", {"length_norm": True}, "source_rejected_lengths", "length_norm=True"),
        ("infifpo", {"clip": True}, "init_rejected_logps", "clip=True"),
        ("infifpo", {"fusion": "max_margin"}, "init_chosen_logps", "fusion='max_margin'"),
        ("infifpo", {"include_pivot_init": True}, "init_chosen_logps", "include_pivot_init=True"),
        ("fpo", {}, "source_chosen_logps", ""),
        ("infifpo", {}, "policy_chosen_logps", ""),
    ],
)
def test_missing_keys_name_the_key_and_the_loss_type(loss_type, settings, missing, reason):
    logps = to_logps(random_rows(seed=10))
    del logps[missing]
    flags = dict(length_norm=False, clip=False, fusion="mean", include_pivot_init=False) | settings
    with pytest.raises(ValueError, match=rf"loss type '{loss_type}' needs {missing}.*{reason}"):
        compute_loss(loss_type=loss_type, logps=logps, beta=0.1, **flags)


def test_keys_a_loss_does_not_use_may_be_absent():
    logps = to_logps(random_rows(seed=11))
    for name in ("init_chosen_logps", "init_rejected_logps", "policy_chosen_lengths", "policy_rejected_lengths",
                 "source_chosen_lengths", "source_rejected_lengths"):
        del logps[name]
    # fpo turns length_norm and clip off whatever the flags say, so it needs neither lengths nor the init.
    compute_loss(loss_type="fpo", logps=logps, beta=0.1, length_norm=True, clip=True, fusion="max_margin",
                 include_pivot_init=True)
    compute_loss(loss_type="infifpo", logps=logps, beta=0.1, length_norm=False, clip=False, fusion="sum",
                 include_pivot_init=False)


def _reshaped(name, new_value):
    def edit(logps):
        logps[name] = new_value(logps[name])
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_reshaped("policy_chosen_logps", lambda v: v[:, None]), r"policy_chosen_logps.*\[B\], got \(8, 1\)"),
        (_reshaped("source_chosen_logps", lambda v: v[:, 0]), r"source_chosen_logps.*\[B, N\], got \(8,\)"),
        (_reshaped("init_rejected_logps", lambda v: v[:5]), r"number of rows B"),
        (_reshaped("source_rejected_lengths", lambda v: v[:, :2]), r"number of sources N"),
    ],
)
def test_inconsistent_shapes_are_reported(edit, message):
    logps = to_logps(random_rows(seed=12))
    edit(logps)
    with pytest.raises(ValueError, match=message):
        compute_loss(loss_type="infifpo", logps=logps, beta=0.1, length_norm=True, clip=True, fusion="mean",
                     include_pivot_init=False)


def test_zero_sources_are_reported():
    logps = to_logps(random_rows(seed=13))
    for name in ("source_chosen_logps", "source_rejected_logps", "source_chosen_lengths", "source_rejected_lengths"):
        logps[name] = logps[name][:, :0]
    with pytest.raises(ValueError, match=r"at least one source"):
        compute_loss(loss_type="infifpo", logps=logps, beta=0.1, length_norm=True, clip=True, fusion="mean",
                     include_pivot_init=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_type": "orpo"}, r"unknown loss type 'orpo'; expected one of \['dpo', 'fpo', 'infifpo', "
                                r"'infifpo_ipo', 'infifpo_wrpo', 'ipo', 'sft', 'wrpo'\]"),
        ({"wrpo_alpha": 1.5}, r"wrpo_alpha must be in \[0, 1\], got 1.5"),
        ({"fusion": "median"}, r"unknown fusion 'median'; expected one of \['mean', 'sum', 'max_margin', "
                               r"'confidence'\]"),
        ({"beta": 0.0}, r"beta and ipo_tau must be > 0"),
        ({"loss_type": "ipo", "ipo_tau": -1.0}, r"beta and ipo_tau must be > 0"),
    ],
)
def test_invalid_settings_are_reported(overrides, message):
    settings = dict(loss_type="infifpo", logps=to_logps(random_rows(seed=14)), beta=0.1, length_norm=True, clip=True,
                    fusion="mean", include_pivot_init=False) | overrides
    with pytest.raises(ValueError, match=message):
        compute_loss(**settings)


# --------------------------------------------------------------------------------------------------------------------
# WRPO
def wrpo_logps(*, seed: int) -> dict[str, torch.Tensor]:
    """The random rows plus WRPO's second chosen response y_wt (the pivot's own), with its own pivot length."""
    rng = random.Random(seed + 1000)
    logps = to_logps(random_rows(seed=seed))
    lengths = torch.tensor([float(rng.randint(3, 40)) for _ in range(len(logps["policy_chosen_logps"]))],
                           dtype=torch.float64)
    logps["policy_chosen_pivot_lengths"] = lengths
    logps["policy_chosen_pivot_logps"] = torch.tensor([rng.uniform(-2.0, -0.2) for _ in lengths],
                                                      dtype=torch.float64) * lengths
    logps["init_chosen_pivot_logps"] = torch.tensor([rng.uniform(-2.0, -0.2) for _ in lengths],
                                                    dtype=torch.float64) * lengths
    return logps


def _wrpo(logps, *, alpha, beta=0.3, length_norm=True):
    return compute_loss(loss_type="wrpo", logps=logps, beta=beta, length_norm=length_norm, clip=True,
                        fusion="max_margin", include_pivot_init=True, wrpo_alpha=alpha)


@pytest.mark.parametrize("length_norm", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_wrpo_matches_hand_computation(alpha, length_norm):
    logps = wrpo_logps(seed=20)
    beta = 0.3
    loss, metrics = _wrpo(logps, alpha=alpha, beta=beta, length_norm=length_norm)
    for row in range(len(loss)):
        def score(model, response, lengths):
            value = logps[f"{model}_{response}_logps"][row].item()
            return value / logps[f"policy_{lengths}_lengths"][row].item() if length_norm else value

        delta = {response: score("policy", response, response) - score("init", response, response)
                 for response in ("chosen", "rejected", "chosen_pivot")}
        h = alpha * delta["chosen"] + (1 - alpha) * delta["chosen_pivot"] - delta["rejected"]
        assert loss[row].item() == pytest.approx(-math.log(1 / (1 + math.exp(-beta * h))), rel=1e-12)
        chosen_reward = beta * (alpha * delta["chosen"] + (1 - alpha) * delta["chosen_pivot"])
        assert metrics["rewards/chosen"][row].item() == pytest.approx(chosen_reward, rel=1e-12)
        assert metrics["rewards/rejected"][row].item() == pytest.approx(beta * delta["rejected"], rel=1e-12)
        assert metrics["rewards/chosen_source"][row].item() == pytest.approx(beta * delta["chosen"], rel=1e-12)
        assert metrics["rewards/chosen_pivot"][row].item() == pytest.approx(beta * delta["chosen_pivot"], rel=1e-12)
        assert metrics["rewards/margins"][row].item() == pytest.approx(beta * h, rel=1e-9, abs=1e-12)
        assert metrics["logps/chosen"][row].item() == pytest.approx(score("policy", "chosen", "chosen"))
        assert metrics["logps/chosen_pivot"][row].item() == pytest.approx(score("policy", "chosen_pivot",
                                                                                "chosen_pivot"))
        assert metrics["wrpo/alpha"][row].item() == alpha
    assert set(REWARD_METRICS + POLICY_METRICS) <= set(metrics)


@pytest.mark.parametrize("length_norm", [False, True])
def test_wrpo_at_alpha_0_is_dpo_on_the_pivot_chosen_and_at_alpha_1_dpo_on_the_source_chosen(length_norm):
    logps = wrpo_logps(seed=21)
    on_source = _wrpo(logps, alpha=1.0, length_norm=length_norm)
    dpo = compute_loss(loss_type="dpo", logps=logps, beta=0.3, length_norm=length_norm, clip=False, fusion="mean",
                       include_pivot_init=False)
    pivot_as_chosen = dict(logps, policy_chosen_logps=logps["policy_chosen_pivot_logps"],
                           policy_chosen_lengths=logps["policy_chosen_pivot_lengths"],
                           init_chosen_logps=logps["init_chosen_pivot_logps"])
    on_pivot = _wrpo(logps, alpha=0.0, length_norm=length_norm)
    dpo_on_pivot = compute_loss(loss_type="dpo", logps=pivot_as_chosen, beta=0.3, length_norm=length_norm,
                                clip=False, fusion="mean", include_pivot_init=False)
    for (loss, metrics), (want_loss, want) in ((on_source, dpo), (on_pivot, dpo_on_pivot)):
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            torch.testing.assert_close(metrics[name], want[name], rtol=0, atol=0)


def test_wrpo_gradient_pushes_both_chosen_up_weighted_by_alpha_and_the_rejected_down():
    logps = wrpo_logps(seed=22)
    names = ("policy_chosen_logps", "policy_chosen_pivot_logps", "policy_rejected_logps")
    leaves = {name: logps[name].clone().requires_grad_(True) for name in names}
    alpha, beta = 0.25, 0.3
    loss, metrics = _wrpo(logps | leaves, alpha=alpha, beta=beta, length_norm=False)
    loss.sum().backward()
    # dL/dh = -beta * sigmoid(-beta h); h = alpha s(y_ws) + (1 - alpha) s(y_wt) - s(y_l)
    dh = -beta * torch.sigmoid(-metrics["rewards/margins"])
    torch.testing.assert_close(leaves["policy_chosen_logps"].grad, alpha * dh)
    torch.testing.assert_close(leaves["policy_chosen_pivot_logps"].grad, (1 - alpha) * dh)
    torch.testing.assert_close(leaves["policy_rejected_logps"].grad, -dh)
    assert (leaves["policy_chosen_logps"].grad < 0).all() and (leaves["policy_rejected_logps"].grad > 0).all()
    assert not any(value.requires_grad for value in metrics.values())


def test_wrpo_length_norm_divides_each_response_by_its_own_length():
    logps = {name: torch.tensor([value]) for name, value in {
        "policy_chosen_logps": -4.0, "policy_chosen_lengths": 4.0, "init_chosen_logps": -8.0,
        "policy_rejected_logps": -6.0, "policy_rejected_lengths": 2.0, "init_rejected_logps": -6.0,
        "policy_chosen_pivot_logps": -10.0, "policy_chosen_pivot_lengths": 10.0, "init_chosen_pivot_logps": -20.0,
    }.items()}
    _, metrics = _wrpo(logps, alpha=0.5, beta=1.0)
    # D(y_ws) = -1 - -2 = 1, D(y_wt) = -1 - -2 = 1, D(y_l) = 0
    assert metrics["rewards/chosen"].item() == pytest.approx(1.0)
    assert metrics["rewards/margins"].item() == pytest.approx(1.0)
    _, metrics = _wrpo(logps, alpha=0.5, beta=1.0, length_norm=False)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5 * 4.0 + 0.5 * 10.0)


@pytest.mark.parametrize("length_norm, missing, reason", [
    (False, "init_chosen_pivot_logps", "own chosen response y_wt"),
    (False, "policy_chosen_pivot_logps", "own chosen response y_wt"),
    (True, "policy_chosen_pivot_lengths", "length_norm=True"),
    (False, "init_rejected_logps", "pivot init is the reference"),
])
def test_wrpo_missing_keys_name_the_key(length_norm, missing, reason):
    logps = wrpo_logps(seed=23)
    del logps[missing]
    with pytest.raises(ValueError, match=rf"loss type 'wrpo' needs {missing}.*{reason}"):
        _wrpo(logps, alpha=0.5, length_norm=length_norm)


def test_wrpo_alpha_ramps_linearly_to_the_target_at_the_last_step():
    assert [wrpo_alpha(target=0.8, step=step, steps=4) for step in range(0, 6)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.6, 0.8, 0.8])
    assert wrpo_alpha(target=0.0, step=3, steps=4) == 0.0
    for bad in (dict(target=1.5, step=1, steps=4), dict(target=0.5, step=1, steps=0),
                dict(target=0.5, step=-1, steps=4)):
        with pytest.raises(ValueError, match="need 0 <= target <= 1"):
            wrpo_alpha(**bad)


# --------------------------------------------------------------------------------------------------------------------
# Issue #19: InfiFPO with IPO's and WRPO's objectives, confidence fusion, label smoothing, sft_weight, SFT
@pytest.mark.parametrize("strategy", STRATEGIES, ids=strategy_id)
def test_infifpo_ipo_matches_hand_computation(strategy):
    length_norm, clip, fusion, include_pivot_init = strategy
    assert_matches_hand_computation(random_rows(seed=30), loss_type="infifpo_ipo", beta=0.4, length_norm=length_norm,
                                    clip=clip, fusion=fusion, include_pivot_init=include_pivot_init, ipo_tau=0.8)


def test_infifpo_ipo_is_ipo_when_the_fused_reference_is_the_pivot_init():
    """One source that equals the pivot init makes the fused reference the init: InfiFPO-IPO is then IPO."""
    logps = to_logps(random_rows(seed=31, num_sources=1))
    for kind in ("chosen", "rejected"):
        logps[f"source_{kind}_logps"] = logps[f"init_{kind}_logps"][:, None].clone()
        logps[f"source_{kind}_lengths"] = logps[f"policy_{kind}_lengths"][:, None].clone()
    flags = dict(beta=0.3, length_norm=True, clip=True, fusion="mean", include_pivot_init=False)
    fused, _ = compute_loss(loss_type="infifpo_ipo", logps=logps, **flags)
    ipo, _ = compute_loss(loss_type="ipo", logps=logps, **flags)
    torch.testing.assert_close(fused, ipo, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fusion", ["mean", "confidence"])
def test_infifpo_ipo_gradient_pulls_the_margin_to_its_target_from_both_sides(fusion):
    """L = (h - 1/(2 tau))^2: dL/ds_pi(y_w) = 2 (h - 1/(2 tau)) (summed scores), negative below the target (descent
    raises the chosen), positive above it (descent lowers it), unlike a sigmoid loss, whose push never changes sign."""
    logps = to_logps(random_rows(seed=32))
    policy_chosen = logps["policy_chosen_logps"].clone().requires_grad_(True)
    logps["policy_chosen_logps"] = policy_chosen
    beta, tau = 0.4, 0.05  # target 1 / (2 tau) = 10: the random rows' margins fall on both sides of it
    loss, metrics = compute_loss(loss_type="infifpo_ipo", logps=logps, beta=beta, length_norm=False, clip=False,
                                 fusion=fusion, include_pivot_init=False, ipo_tau=tau)
    loss.sum().backward()
    h = metrics["rewards/margins"] / beta
    torch.testing.assert_close(policy_chosen.grad, 2 * (h - 1 / (2 * tau)))
    below = h < 1 / (2 * tau)
    assert below.any() and (~below).any()
    assert (policy_chosen.grad[below] < 0).all() and (policy_chosen.grad[~below] > 0).all()


def test_confidence_fusion_weighs_the_source_surer_of_the_chosen_response_more():
    # Two sources, per token: A -0.5 on y_w (surer), B -2.5; gammas e^-0.5 / (e^-0.5 + e^-2.5) = 0.8808, 0.1192.
    logps = {name: torch.tensor(value, dtype=torch.float64) for name, value in {
        "policy_chosen_logps": [-10.0], "policy_rejected_logps": [-12.0], "policy_chosen_lengths": [10.0],
        "policy_rejected_lengths": [10.0],
        "source_chosen_logps": [[-5.0, -15.0]], "source_chosen_lengths": [[10.0, 6.0]],
        "source_rejected_logps": [[-20.0, -9.0]], "source_rejected_lengths": [[10.0, 6.0]],
    }.items()}
    _, metrics = compute_loss(loss_type="infifpo", logps=logps, beta=1.0, length_norm=True, clip=False,
                              fusion="confidence", include_pivot_init=False)
    gamma_a = math.exp(-0.5) / (math.exp(-0.5) + math.exp(-2.5))
    assert metrics["fusion/weight_0"].item() == pytest.approx(gamma_a, rel=1e-12)
    assert metrics["fusion/weight_1"].item() == pytest.approx(1 - gamma_a, rel=1e-12)
    # F(y_w) = gamma_a * -0.5 + gamma_b * -2.5; F(y_l) = gamma_a * -2.0 + gamma_b * -1.5; rewards = s_pi - F
    fused_w, fused_l = gamma_a * -0.5 + (1 - gamma_a) * -2.5, gamma_a * -2.0 + (1 - gamma_a) * -1.5
    assert metrics["rewards/chosen"].item() == pytest.approx(-1.0 - fused_w, rel=1e-12)
    assert metrics["rewards/rejected"].item() == pytest.approx(-1.2 - fused_l, rel=1e-12)
    # Equally confident sources: exactly the mean fusion
    logps["source_chosen_logps"] = torch.tensor([[-5.0, -3.0]], dtype=torch.float64)
    flags = dict(beta=1.0, length_norm=True, clip=False, include_pivot_init=False)
    loss, _ = compute_loss(loss_type="infifpo", logps=logps, fusion="confidence", **flags)
    mean, _ = compute_loss(loss_type="infifpo", logps=logps, fusion="mean", **flags)
    torch.testing.assert_close(loss, mean, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["dpo", "infifpo", "wrpo", "infifpo_wrpo"])
def test_label_smoothing_matches_conservative_dpo(loss_type):
    logps = wrpo_logps(seed=32)
    flags = dict(loss_type=loss_type, beta=0.5, length_norm=True, clip=True, fusion="mean", include_pivot_init=False,
                 wrpo_alpha=0.4)
    plain, metrics = compute_loss(logps=logps, **flags)
    smoothed, _ = compute_loss(logps=logps, label_smoothing=0.2, **flags)
    h = metrics["rewards/margins"] / 0.5  # beta * h is the margin of the rewards
    expected = -0.8 * torch.nn.functional.logsigmoid(0.5 * h) - 0.2 * torch.nn.functional.logsigmoid(-0.5 * h)
    torch.testing.assert_close(smoothed, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain, -torch.nn.functional.logsigmoid(0.5 * h), rtol=1e-12, atol=1e-12)


def test_label_smoothing_stops_pushing_the_margin_past_its_optimum():
    """dL/dh = -beta (1 - eps) sigmoid(-beta h) + beta eps sigmoid(beta h) vanishes at beta h* = log((1 - eps) / eps)
    (log 4 at eps = 0.2): below it descent raises the chosen log-prob, above it lowers it; the plain loss always
    raises it."""
    margins = torch.tensor([-2.0, 0.0, 1.0, 1.3, 1.5, 3.0, 8.0], dtype=torch.float64)  # beta h, beta = 1
    chosen = (-10.0 + margins).requires_grad_(True)
    others = ("policy_rejected_logps", "init_chosen_logps", "init_rejected_logps")
    logps = {"policy_chosen_logps": chosen, **{name: torch.full_like(margins, -10.0) for name in others}}
    flags = dict(loss_type="dpo", beta=1.0, length_norm=False, clip=False, fusion="mean", include_pivot_init=False)
    (smoothed,) = torch.autograd.grad(compute_loss(logps=logps, label_smoothing=0.2, **flags)[0].sum(), chosen)
    (plain,) = torch.autograd.grad(compute_loss(logps=logps, **flags)[0].sum(), chosen)
    assert (plain < 0).all()
    assert (torch.sign(smoothed) == torch.where(margins < math.log(4.0), -1.0, 1.0)).all(), smoothed
    torch.testing.assert_close(smoothed, -0.8 * torch.sigmoid(-margins) + 0.2 * torch.sigmoid(margins))


@pytest.mark.parametrize("loss_type", ["ipo", "infifpo_ipo", "sft"])
def test_label_smoothing_is_refused_where_there_is_no_sigmoid(loss_type):
    with pytest.raises(ValueError, match=rf"applies to the sigmoid losses only; got 0.1 for loss type '{loss_type}'"):
        compute_loss(loss_type=loss_type, logps=wrpo_logps(seed=33), beta=0.5, length_norm=True, clip=False,
                     fusion="mean", include_pivot_init=False, label_smoothing=0.1)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "infifpo", "wrpo"])
def test_sft_weight_adds_the_chosen_nll_per_token_and_pulls_the_chosen_up(loss_type):
    logps = wrpo_logps(seed=34)
    flags = dict(loss_type=loss_type, beta=0.5, length_norm=False, clip=False, fusion="sum", include_pivot_init=False,
                 wrpo_alpha=0.3)
    leaf = logps["policy_chosen_logps"].clone().requires_grad_(True)
    base, _ = compute_loss(logps=dict(logps, policy_chosen_logps=leaf), **flags)
    (base_grad,) = torch.autograd.grad(base.sum(), leaf)
    with_nll, metrics = compute_loss(logps=dict(logps, policy_chosen_logps=leaf), sft_weight=0.7, **flags)
    nll = -logps["policy_chosen_logps"] / logps["policy_chosen_lengths"]
    torch.testing.assert_close(metrics["nll/chosen"], nll, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_nll, base.detach() + 0.7 * nll, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(with_nll.sum(), leaf)
    # d/d l(y_w) of 0.7 * -l / |y_w|: -0.7 / |y_w|, a push up of the chosen log-prob on top of the preference's
    torch.testing.assert_close(grad - base_grad, -0.7 / logps["policy_chosen_lengths"], rtol=1e-12, atol=1e-12)
    # TRL's rpo_alpha averages over all chosen tokens of its batch: the same number when the lengths are equal
    equal = dict(logps, policy_chosen_lengths=torch.full_like(logps["policy_chosen_lengths"], 7.0))
    ours = compute_loss(logps=equal, sft_weight=1.0, **flags)[1]["nll/chosen"].mean()
    assert ours.item() == pytest.approx((-equal["policy_chosen_logps"].sum() / (7.0 * len(leaf))).item(), rel=1e-12)


def test_sft_loss_is_the_nll_sum_of_each_chosen_response():
    logps = {"policy_chosen_logps": torch.tensor([-3.0, -7.5], dtype=torch.float64, requires_grad=True),
             "policy_chosen_lengths": torch.tensor([2.0, 5.0], dtype=torch.float64)}
    loss, metrics = compute_loss(loss_type="sft", logps=logps, beta=0.1, length_norm=True, clip=True, fusion="mean",
                                 include_pivot_init=False)
    assert loss.tolist() == [3.0, 7.5] and metrics["logps/chosen"].tolist() == [-3.0, -7.5]
    loss.sum().backward()
    assert logps["policy_chosen_logps"].grad.tolist() == [-1.0, -1.0]  # descent raises every chosen log-prob
    assert LOSSES["sft"].token_level and LOSSES["sft"].responses == ("chosen",)
    assert not LOSSES["sft"].needs_init_scores(LossOptions(beta=0.1, length_norm=True, clip=True, fusion="max_margin",
                                                           include_pivot_init=True))
    with pytest.raises(ValueError, match="sft_weight must be >= 0 and applies to the preference losses only"):
        compute_loss(loss_type="sft", logps=logps, beta=0.1, length_norm=True, clip=True, fusion="mean",
                     include_pivot_init=False, sft_weight=0.5)


def _fused_wrpo(logps, *, alpha, **flags):
    settings = dict(beta=0.3, length_norm=True, clip=True, fusion="mean", include_pivot_init=False) | flags
    return compute_loss(loss_type="infifpo_wrpo", logps=logps, wrpo_alpha=alpha, **settings)


@pytest.mark.parametrize("fusion", ["mean", "max_margin", "confidence"])
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_infifpo_wrpo_matches_hand_computation(alpha, fusion):
    """WRPO's margin with InfiFPO's fused reference for y_ws and y_l; y_wt against the pivot init."""
    logps = wrpo_logps(seed=35)
    rows = random_rows(seed=35)
    loss, metrics = _fused_wrpo(logps, alpha=alpha, fusion=fusion)
    for index, row in enumerate(rows):
        infifpo = expected_row(row, loss_type="infifpo", beta=0.3, length_norm=True, clip=True, fusion=fusion)
        source_delta = infifpo["rewards/chosen"] / 0.3  # s_pi(y_ws) - F(y_ws)
        rejected_delta = infifpo["rewards/rejected"] / 0.3
        length = logps["policy_chosen_pivot_lengths"][index].item()
        pivot_delta = (logps["policy_chosen_pivot_logps"][index].item()
                       - logps["init_chosen_pivot_logps"][index].item()) / length
        h = alpha * source_delta + (1 - alpha) * pivot_delta - rejected_delta
        assert loss[index].item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.3 * h))), rel=1e-12)
        assert metrics["rewards/chosen_source"][index].item() == pytest.approx(0.3 * source_delta, rel=1e-12)
        assert metrics["rewards/chosen_pivot"][index].item() == pytest.approx(0.3 * pivot_delta, rel=1e-12)
        for name in ("fusion/clip_rate_chosen", "fusion/clip_rate_rejected"):
            assert metrics[name][index].item() == pytest.approx(infifpo[name])
    assert set(LOSSES["infifpo_wrpo"].metrics) <= set(metrics)


def test_infifpo_wrpo_at_alpha_1_is_infifpo_and_its_gradient_splits_the_chosen_push_by_alpha():
    logps = wrpo_logps(seed=36)
    flags = dict(beta=0.3, length_norm=False, clip=True, fusion="max_margin", include_pivot_init=False)
    at_one, _ = _fused_wrpo(logps, alpha=1.0, **flags)
    infifpo, _ = compute_loss(loss_type="infifpo", logps=logps, **flags)
    torch.testing.assert_close(at_one, infifpo, rtol=0, atol=0)
    names = ("policy_chosen_logps", "policy_chosen_pivot_logps", "policy_rejected_logps")
    leaves = {name: logps[name].clone().requires_grad_(True) for name in names}
    loss, metrics = _fused_wrpo(logps | leaves, alpha=0.25, **flags)
    loss.sum().backward()
    dh = -0.3 * torch.sigmoid(-metrics["rewards/margins"])
    torch.testing.assert_close(leaves["policy_chosen_logps"].grad, 0.25 * dh)
    torch.testing.assert_close(leaves["policy_chosen_pivot_logps"].grad, 0.75 * dh)
    torch.testing.assert_close(leaves["policy_rejected_logps"].grad, -dh)


def test_wrpo_alpha_follows_the_authors_schedule_from_0_at_the_first_step():
    """SLIT-AI/WRPO: LinearDecayScheduler(start_value=0, end_value=alpha, start_step=0, end_step=K) read at the
    Trainer's global_step, which is 0 during the first optimizer step and K - 1 during the last."""
    steps, target = 5, 0.1  # their Llama-3-8B config: alpha 0.1
    authors = [0 + (target - 0) * ((global_step - 0) / steps) for global_step in range(steps)]
    assert [wrpo_alpha(target=target, step=completed, steps=steps) for completed in range(steps)] == \
        pytest.approx(authors, rel=0, abs=1e-15)
    assert authors[0] == 0.0 and authors[-1] == pytest.approx(0.08)
