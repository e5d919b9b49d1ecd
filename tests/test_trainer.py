"""Multi-process (gloo) runs of the real entry point: layouts agree, resume continues exactly, errors are clear."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from infifpo_mcore.losses import LOSSES
from tests.launcher import REPO, read_metrics, run_default_job, run_training

pytestmark = pytest.mark.distributed
STEPS = 4


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """24 training rows, and beside them 5 held-out rows (eval.jsonl): an odd count, so data-parallel shares are
    padded and the duplicates must be dropped."""
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    rows = (REPO / "launch/data/tiny_prefs_train.jsonl").read_text().splitlines()[:24]
    path.write_text("\n".join(rows) + "\n")
    held_out = (REPO / "launch/data/tiny_prefs_eval.jsonl").read_text().splitlines()[:5]
    path.with_name("eval.jsonl").write_text("\n".join(held_out) + "\n")
    return path


@pytest.fixture(scope="module")
def data_with_source_scores(small_data, tmp_path_factory) -> Path:
    """The same rows with cached scores of two sources in InfiFPO form (test input: arbitrary but valid numbers)."""
    path = tmp_path_factory.mktemp("fused") / "prefs.jsonl"
    lines = []
    for index, line in enumerate(small_data.read_text().splitlines()):
        row = json.loads(line)
        lengths = {"chosen": [7 + index % 3, 11 + index % 5], "rejected": [6 + index % 4, 12 + index % 2]}
        per_token = {"chosen": [-2.0 - 0.1 * (index % 7), -1.5 - 0.2 * (index % 3)],
                     "rejected": [-2.2 - 0.05 * (index % 5), -1.4 - 0.3 * (index % 4)]}
        for kind in ("chosen", "rejected"):
            row[f"fuse_mean_{kind}_logps"] = per_token[kind]
            row[f"fuse_{kind}_logps"] = [m * n for m, n in zip(per_token[kind], lengths[kind])]
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def _overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={data}", f"run_dir={run_dir}", f"data.eval_path={data.with_name('eval.jsonl')}",
        "train.eval_interval=2", "model.seq_length=128", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.warmup_steps=1", "train.lr=2e-3", "checkpoint.save=null", *extra,
    ]


def _one_step_at_tp1(data: Path, root: Path, *extra: str) -> Path:
    """One optimizer step from the random init at TP 1 x PP 1 (so Adam has state), saved to root/ckpt: where the
    layout comparisons below start."""
    run_training(nproc=1, overrides=_overrides(data, root, "train.steps=1", f"checkpoint.save={root / 'ckpt'}",
                                               "parallel.tensor=1", "parallel.pipeline=1", "train.warmup_steps=0",
                                               *extra))
    return root / "ckpt"


@pytest.fixture(scope="module")
def step1_checkpoint(small_data, tmp_path_factory) -> Path:
    """One optimizer step at TP 1 (so Adam has state), saved: every layout below starts from it."""
    return _one_step_at_tp1(small_data, tmp_path_factory.mktemp("step1"))


def _continue(small_data, checkpoint, run_dir, *, nproc, tensor, pipeline, steps=STEPS, save=None,
              extra=(), timeout=300) -> list[dict]:
    extra = [f"checkpoint.load={checkpoint}", f"train.steps={steps}", f"parallel.tensor={tensor}",
             f"parallel.pipeline={pipeline}", *extra]
    if save:
        extra.append(f"checkpoint.save={save}")
    run_training(nproc=nproc, overrides=_overrides(small_data, run_dir, *extra), timeout=timeout)
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def tp1_run(small_data, step1_checkpoint, tmp_path_factory) -> list[dict]:
    return _continue(small_data, step1_checkpoint, tmp_path_factory.mktemp("tp1"), nproc=1, tensor=1, pipeline=1)


def _assert_same_losses(ours: list[dict], reference: list[dict], *, rtol: float, evaluated: bool = True) -> None:
    assert [m["step"] for m in ours] == [m["step"] for m in reference] == list(range(2, STEPS + 1))
    for got, want in zip(ours, reference):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=rtol, abs=1e-6), (got["step"], key)
        assert ("eval/loss" in got) == ("eval/loss" in want) == (evaluated and got["step"] % 2 == 0)
        if "eval/loss" in got:
            for key in ("eval/loss", "eval/rewards/accuracies"):
                assert got[key] == pytest.approx(want[key], rel=rtol, abs=1e-6), (got["step"], key)


def test_tp1_run_trains(tp1_run):
    # metrics.jsonl's contract: the trainer's keys and every metric of the loss (the tests train DPO)
    step_keys = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", *LOSSES["dpo"].metrics}
    assert all(step_keys <= metrics.keys() for metrics in tp1_run)
    assert all(m["lr"] > 0 and m["grad_norm"] > 0 and m["tokens_per_sec"] > 0 for m in tp1_run)
    assert len({round(m["loss"], 6) for m in tp1_run}) == len(tp1_run)  # the parameters move


@pytest.mark.newest_mcore
def test_tp2_pp2_equals_tp1_from_the_same_checkpoint(small_data, step1_checkpoint, tp1_run, tmp_path):
    metrics = _continue(small_data, step1_checkpoint, tmp_path, nproc=4, tensor=2, pipeline=2)
    _assert_same_losses(metrics, tp1_run, rtol=1e-5)


def test_data_parallel_2_equals_data_parallel_1(small_data, step1_checkpoint, tp1_run, tmp_path):
    metrics = _continue(small_data, step1_checkpoint, tmp_path, nproc=2, tensor=1, pipeline=1)
    _assert_same_losses(metrics, tp1_run, rtol=1e-5)


def test_save_load_continue_matches_the_uninterrupted_run(small_data, step1_checkpoint, tp1_run, tmp_path):
    first = _continue(small_data, step1_checkpoint, tmp_path / "a", nproc=1, tensor=1, pipeline=1, steps=3,
                      save=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000003"
    second = _continue(small_data, tmp_path / "ckpt", tmp_path / "b", nproc=1, tensor=1, pipeline=1)
    assert [m["step"] for m in second] == [4]
    resumed = first + second
    for got, want in zip(resumed, tp1_run):
        assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]  # bit-exact on CPU
        if "eval/loss" in want:  # the eval reference (pivot-init scores) came back from the checkpoint
            assert got["eval/loss"] == want["eval/loss"]


@pytest.mark.newest_mcore
def test_distributed_optimizer_at_dp2_equals_dp1_resumes_exactly_and_at_dp1(small_data, step1_checkpoint, tp1_run,
                                                                            tmp_path):
    """DP 2 with Megatron's distributed optimizer on its torch-Adam fallback (compat.torch_adam) and the weight
    all-gather overlapped with the next forward: the DP 1 run's steps (1e-6). Saved at step 3, it resumes bit-exactly
    at DP 2, and at DP 1, where auto picks the plain optimizer: the checkpoint's optimizer state is read in the other
    format (its main weights: the model's), and the weights saved are whole (gathered before the save)."""
    distributed = ["parallel.distributed_optimizer=true", "parallel.overlap_param_gather=true",
                   "parallel.ddp_bucket_size=20000", "checkpoint.save_interval=3"]
    whole = _continue(small_data, step1_checkpoint, tmp_path / "dp2", nproc=2, tensor=1, pipeline=1,
                      save=tmp_path / "ckpt", extra=distributed)
    _assert_same_losses(whole, tp1_run, rtol=1e-6)
    step3 = tmp_path / "ckpt" / "iter_0000003"
    resumed = _continue(small_data, step3, tmp_path / "dp2_resumed", nproc=2, tensor=1, pipeline=1,
                        extra=distributed[:3])
    assert [m["step"] for m in resumed] == [4]
    assert resumed[0]["loss"] == whole[-1]["loss"] and resumed[0]["grad_norm"] == whole[-1]["grad_norm"]
    assert resumed[0]["eval/loss"] == whole[-1]["eval/loss"]
    on_one_rank = _continue(small_data, step3, tmp_path / "dp1", nproc=1, tensor=1, pipeline=1)
    for key in ("loss", "grad_norm", "eval/loss"):
        assert on_one_rank[0][key] == pytest.approx(tp1_run[-1][key], rel=1e-6), key


# bf16 rounds to 8 significant bits: unit roundoff u = 2^-9 (half the spacing 2^-8 = 3.9e-3 between neighbours).
BF16_ROUNDOFF = 2.0**-9


def test_bf16_at_tp2_pp2_dp2_with_the_distributed_optimizer_matches_tp1_bf16(small_data, step1_checkpoint, tmp_path):
    """Megatron's bf16 path (bf16 weights, fp32 main weights and gradient accumulation) at TP 2 x PP 2 x DP 2 with the
    distributed optimizer, against TP 1 in bf16, both from the fp32 step-1 checkpoint (read as bf16 weights and fp32
    main weights). The layouts round at different points (TP partial sums rounded to bf16 before their all-reduce,
    other micro-batches): one bf16 rounding of the value itself, u, is allowed on losses and gradient norms; the
    log-prob sums (~85 nats over ~40 tokens) average their roundings, u / 2. Measured: sums within 6e-5, losses
    within 3.4e-4, gradient norms within 3.7e-4 (relative)."""
    bf16 = ["train.precision=bf16"]
    tp1 = _continue(small_data, step1_checkpoint, tmp_path / "tp1", nproc=1, tensor=1, pipeline=1, extra=bf16)
    spread = _continue(small_data, step1_checkpoint, tmp_path / "tp2pp2dp2", nproc=8, tensor=2, pipeline=2,
                       extra=[*bf16, "train.micro_batch_size=1", "parallel.distributed_optimizer=true"], timeout=900)
    assert [m["step"] for m in spread] == [m["step"] for m in tp1] == list(range(2, STEPS + 1))
    for got, want in zip(spread, tp1):
        for key in ("loss", "grad_norm", "eval/loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=BF16_ROUNDOFF), (got["step"], key)
        for key in ("logps/chosen", "logps/rejected", "eval/logps/chosen"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=BF16_ROUNDOFF / 2), (got["step"], key)


def test_bf16_follows_the_fp32_loss_curve_of_the_default_job(tmp_path):
    """20 steps of the shipped job (launch/configs/tiny_cpu.yaml: InfiFPO on the bundled scored pairs, 4 micro-batches
    per step; one rank, the layout does not change the curve) in bf16 and in fp32. After each step the bf16 weights
    are the fp32 main weights rounded (relative error <= u per weight) and every layer's output is rounded again:
    each step's loss may differ by one bf16 spacing (2u), its gradient norm by 5u, and the held-out loss after the
    20 steps by u. Measured: losses within 9.4e-4 (mean 3.1e-4), gradient norms within 3.4e-3, held-out 6.9e-5."""
    runs = {}
    for precision in ("fp32", "bf16"):
        run_default_job(nproc=1, overrides=["train.steps=20", "checkpoint.save=null", "parallel.tensor=1",
                                            "parallel.pipeline=1", f"train.precision={precision}",
                                            f"run_dir={tmp_path / precision}"], timeout=900)
        runs[precision] = read_metrics(tmp_path / precision)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert [m["step"] for m in bf16] == [m["step"] for m in fp32] == list(range(1, 21))
    for got, want in zip(bf16, fp32):
        assert got["loss"] == pytest.approx(want["loss"], rel=2 * BF16_ROUNDOFF), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=5 * BF16_ROUNDOFF), got["step"]
    assert bf16[-1]["eval/loss"] == pytest.approx(fp32[-1]["eval/loss"], rel=BF16_ROUNDOFF)
    assert any(got["loss"] != want["loss"] for got, want in zip(bf16, fp32))  # bf16 did round


def test_infifpo_max_margin_at_tp2_pp2_equals_tp1_and_reports_fusion(
    data_with_source_scores, step1_checkpoint, tmp_path
):
    infifpo = ["loss.type=infifpo", "loss.fusion=max_margin", "loss.clip=true", "loss.length_norm=true",
               "loss.beta=2.5", "data.eval_path=null"]
    runs = {}
    for name, (nproc, tensor, pipeline) in {"tp1": (1, 1, 1), "tp2pp2": (4, 2, 2)}.items():
        extra = [f"checkpoint.load={step1_checkpoint}", f"train.steps={STEPS}", f"parallel.tensor={tensor}",
                 f"parallel.pipeline={pipeline}", *infifpo]
        run_training(nproc=nproc, overrides=_overrides(data_with_source_scores, tmp_path / name, *extra))
        runs[name] = read_metrics(tmp_path / name)
    _assert_same_losses(runs["tp2pp2"], runs["tp1"], rtol=1e-5, evaluated=False)
    for metrics in runs["tp1"]:
        picked = [metrics["fusion/picked_source_0"], metrics["fusion/picked_source_1"]]
        assert sum(picked) == pytest.approx(1.0)  # one source per row
        assert 0.0 <= metrics["fusion/clip_rate_chosen"] <= 1.0


def test_infifpo_max_margin_without_clip_scores_the_pivot_init_it_needs(data_with_source_scores, tmp_path):
    """Issue #16, 1: max_margin picks each row's source by its distance to the pivot init's margin, so it needs the
    init's scores also without clip and include_pivot_init; such a run used to decide it needed none and die with a
    ValueError on the last stage at step 1."""
    result = run_training(nproc=1, overrides=_overrides(
        data_with_source_scores, tmp_path, "loss.type=infifpo", "loss.fusion=max_margin", "loss.clip=false",
        "loss.include_pivot_init=false", "parallel.tensor=1", "parallel.pipeline=1", "train.steps=2",
        "data.eval_path=null"))
    assert "scoring its 24 rows with the pivot init" in result.stderr
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(sum(m[f"fusion/picked_source_{i}"] for i in range(2)) == pytest.approx(1.0) for m in metrics)


def test_eval_on_start_and_per_row_dumps_cover_every_held_out_row_once(small_data, tmp_path):
    """Pipeline 2 x data-parallel 2 over 5 held-out rows: the shares are padded, the dump still has each row once,
    in file order, and its rows average to the logged evaluation metrics."""
    run_training(nproc=4, overrides=_overrides(small_data, tmp_path, "train.steps=2", "parallel.tensor=1",
                                                "parallel.pipeline=2", "train.eval_on_start=true",
                                                "logging.eval_rows=true"))
    metrics = {m["step"]: m for m in read_metrics(tmp_path)}
    assert "loss" not in metrics[0] and "eval/loss" in metrics[0]  # step 0: the evaluation only
    ids = [json.loads(line).get("id", index + 1)
           for index, line in enumerate(small_data.with_name("eval.jsonl").read_text().splitlines())]
    dumps = {}
    for step in (0, 2):
        rows = [json.loads(line) for line in (tmp_path / "eval_rows" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        assert [row["id"] for row in rows] == ids
        for key in ("loss", "policy_margin", "rewards/accuracies"):
            assert sum(row[key] for row in rows) / len(rows) == pytest.approx(metrics[step][f"eval/{key}"], abs=1e-5)
        for row in rows:
            assert row["policy_chosen_lengths"] >= 1 and row["policy_chosen_logps"] < 0
            # DPO without length norm reports the policy's sums as logps/*: the same numbers, from one pass
            assert row["policy_chosen_logps"] == pytest.approx(row["logps/chosen"], abs=1e-4)
            assert row["policy_rejected_logps"] == pytest.approx(row["logps/rejected"], abs=1e-4)
            assert row["policy_margin"] == pytest.approx(
                row["policy_chosen_logps"] / row["policy_chosen_lengths"]
                - row["policy_rejected_logps"] / row["policy_rejected_lengths"], abs=1e-5)
        dumps[step] = rows
    # DPO's reference is the pivot init: before any step every reward is 0; training then moves the log-probs
    assert all(row["rewards/chosen"] == pytest.approx(0.0, abs=1e-5) for row in dumps[0])
    assert all(a["policy_chosen_logps"] != b["policy_chosen_logps"] for a, b in zip(dumps[0], dumps[2]))


def test_the_checkpoint_records_the_train_state(step1_checkpoint):
    state = json.loads((step1_checkpoint / "iter_0000001" / "train_state.json").read_text())
    assert state["step"] == 1 and state["sampler"]["consumed"] == 4
    from safetensors.torch import load_file

    scores = load_file(step1_checkpoint / "iter_0000001" / "pivot_init_scores.safetensors")
    assert scores["chosen_logps"].shape == (24,) and scores["eval/rejected_logps"].shape == (5,)
    assert (scores["chosen_logps"] < 0).all() and (scores["eval/chosen_logps"] < 0).all()


def test_fused_loss_without_source_scores_is_refused_at_start(small_data, tmp_path):
    with pytest.raises(AssertionError, match="needs source scores"):
        run_training(nproc=1, overrides=_overrides(small_data, tmp_path, "loss.type=infifpo", "parallel.tensor=1",
                                                   "parallel.pipeline=1", "train.steps=2"))


def test_a_layout_that_does_not_fit_the_world_is_refused_before_start(small_data, tmp_path):
    with pytest.raises(AssertionError, match="parallel.tensor"):
        run_training(nproc=2, overrides=_overrides(small_data, tmp_path, "parallel.tensor=4", "train.steps=2"))


@pytest.fixture(scope="module")
def four_layer_step1_checkpoint(small_data, tmp_path_factory) -> Path:
    """step1_checkpoint's run with 4 layers: a pipeline of 2 stages x 2 virtual stages has one layer per chunk."""
    return _one_step_at_tp1(small_data, tmp_path_factory.mktemp("step1_4_layers"), "model.num_layers=4")


def test_the_virtual_pipeline_trains_as_the_plain_pipeline(small_data, four_layer_step1_checkpoint, tmp_path):
    """PP 2 x VPP 2 x DP 2 (two model chunks per rank, Megatron's interleaved schedule; the distributed optimizer with
    the overlapped gradient reduce started per chunk) gives PP 2's steps and evaluations (held-out shares padded to
    whole groups of PP micro-batches) from one checkpoint. It diverged after the warm-up micro-batches before: each
    chunk's forward_step reads every micro-batch, so each chunk needs its own iterator over them, and at PP 2
    Megatron's batched p2p swaps an activation and a gradient sent to the same peer (docs/repro/vpp_batched_p2p.py);
    the interleaved schedule now runs it unbatched, as Megatron-LM configures it.

    Packed (the default here), each rank's 2 pairs of a step fit one micro-batch and are split into a group of PP;
    unpacked, it runs 2 micro-batches of 1 pair, padded rows: packed equals unpacked within 1e-5 (as in the packing
    tests below)."""
    common = ["model.num_layers=4", "train.micro_batch_size=1"]
    interleaving = [*common, "parallel.virtual_pipeline=2", "parallel.distributed_optimizer=true"]
    plain = _continue(small_data, four_layer_step1_checkpoint, tmp_path / "pp2", nproc=2, tensor=1, pipeline=2,
                      extra=common)
    interleaved = _continue(small_data, four_layer_step1_checkpoint, tmp_path / "vpp2", nproc=4, tensor=1, pipeline=2,
                            extra=interleaving)
    _assert_same_losses(interleaved, plain, rtol=1e-5)
    unpacked = _continue(small_data, four_layer_step1_checkpoint, tmp_path / "vpp2_unpacked", nproc=4, tensor=1,
                         pipeline=2, extra=[*interleaving, "data.packing=false"])
    assert [m["step"] for m in unpacked] == [m["step"] for m in plain]
    for got, want in zip(unpacked, plain):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "eval/loss", "eval/rewards/accuracies"):
            assert (key in got) == (key in want)
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (got["step"], key)


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(small_data, tmp_path):
    with pytest.raises(AssertionError, match=r"model.vocab_size \(1000\) is smaller than the tokenizer's vocabulary"):
        run_training(nproc=1, overrides=_overrides(small_data, tmp_path, "model.vocab_size=1000", "parallel.tensor=1",
                                                   "parallel.pipeline=1", "train.steps=2"))


# --------------------------------------------------------------------------------------------------------------------
# WRPO: a third response per row (the pivot's own chosen one) through the pipeline, its init scores in checkpoints
WRPO = ["loss.type=wrpo", "loss.wrpo_alpha=0.6", "loss.length_norm=true", "loss.beta=1.0"]


@pytest.fixture(scope="module")
def wrpo_data(small_data, tmp_path_factory) -> Path:
    """The small rows (train and eval.jsonl) with a chosen_pivot: the correct answer phrased differently."""
    directory = tmp_path_factory.mktemp("wrpo")
    for name, source in (("prefs.jsonl", small_data), ("eval.jsonl", small_data.with_name("eval.jsonl"))):
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        for row in rows:
            answer = row["chosen"][0]["content"].removeprefix("The answer is ")
            row["chosen_pivot"] = [{"role": "assistant", "content": f"So the result is {answer}"}]
        (directory / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory / "prefs.jsonl"


@pytest.fixture(scope="module")
def wrpo_step1_checkpoint(wrpo_data, tmp_path_factory) -> Path:
    return _one_step_at_tp1(wrpo_data, tmp_path_factory.mktemp("wrpo_step1"), *WRPO)


def test_wrpo_at_tp2_pp2_equals_tp1_resuming_with_the_init_scores_of_the_pivot_chosen(
    wrpo_data, wrpo_step1_checkpoint, tmp_path
):
    from safetensors.torch import load_file

    saved = load_file(wrpo_step1_checkpoint / "iter_0000001" / "pivot_init_scores.safetensors")
    assert saved["chosen_pivot_logps"].shape == (24,) and saved["eval/chosen_pivot_logps"].shape == (5,)
    assert (saved["chosen_pivot_logps"] < 0).all() and not torch.equal(saved["chosen_pivot_logps"],
                                                                         saved["chosen_logps"])
    runs = {}
    for name, (nproc, tensor, pipeline) in {"tp1": (1, 1, 1), "tp2pp2": (4, 2, 2)}.items():
        # Resumed at step 1, the pivot is no longer its init: the y_wt reference can only come from the checkpoint.
        runs[name] = _continue(wrpo_data, wrpo_step1_checkpoint, tmp_path / name, nproc=nproc, tensor=tensor,
                               pipeline=pipeline, extra=WRPO)
    _assert_same_losses(runs["tp2pp2"], runs["tp1"], rtol=1e-5)
    tp1 = runs["tp1"]
    # SLIT-AI/WRPO's ramp: alpha = target x (steps done before this one) / steps, 0 at the first step
    assert [m["wrpo/alpha"] for m in tp1] == pytest.approx([0.6 * (step - 1) / STEPS for step in range(2, STEPS + 1)])
    assert all(math.isfinite(m["loss"]) for m in tp1) and len({round(m["loss"], 6) for m in tp1}) == len(tp1)
    for m in tp1:
        mixed = m["wrpo/alpha"] * m["rewards/chosen_source"] + (1 - m["wrpo/alpha"]) * m["rewards/chosen_pivot"]
        assert m["rewards/chosen"] == pytest.approx(mixed, rel=1e-5, abs=1e-6)
        if "eval/loss" in m:  # evaluated with the alpha of the step it follows
            assert m["eval/wrpo/alpha"] == m["wrpo/alpha"]


def test_wrpo_whose_pivot_chosen_is_the_chosen_trains_exactly_as_dpo(small_data, tmp_path):
    """y_wt = y_ws makes WRPO's margin alpha*D(y_w) + (1 - alpha)*D(y_w) - D(y_l): DPO's, whatever alpha; the whole
    pipeline (a third response per row, its init scores, the alpha ramp) must then give DPO's steps."""
    rows = [json.loads(line) for line in small_data.read_text().splitlines()]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row | {"chosen_pivot": row["chosen"]}) + "\n" for row in rows))
    runs = {}
    for loss in ("dpo", "wrpo"):
        run_training(nproc=1, overrides=_overrides(data, tmp_path / loss, "parallel.tensor=1", "parallel.pipeline=1",
                                                   "train.steps=3", "data.eval_path=null", f"loss.type={loss}",
                                                   "loss.wrpo_alpha=0.7", "loss.length_norm=false", "loss.beta=0.5"))
        runs[loss] = read_metrics(tmp_path / loss)
    for got, want in zip(runs["wrpo"], runs["dpo"], strict=True):
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key  # alpha*x + (1-alpha)*x: rounding
    # alpha 0, 0.7/3, 1.4/3: DPO's steps for every alpha, 0 included
    assert [m["wrpo/alpha"] for m in runs["wrpo"]] == pytest.approx([0.0, 0.7 / 3, 1.4 / 3])


def test_wrpo_refuses_data_without_chosen_pivot_and_a_checkpoint_without_its_init_scores(
    small_data, wrpo_data, step1_checkpoint, tmp_path
):
    with pytest.raises(AssertionError, match=rf"{small_data}: no row has a chosen_pivot field, which loss.type=wrpo"):
        run_training(nproc=1, overrides=_overrides(small_data, tmp_path / "a", "parallel.tensor=1",
                                                   "parallel.pipeline=1", "train.steps=2", *WRPO))
    # The DPO checkpoint holds init scores of chosen and rejected only, and its pivot has trained a step.
    with pytest.raises(AssertionError, match=r"no pivot-init scores for the train data of the chosen_pivot"):
        run_training(nproc=1, overrides=_overrides(wrpo_data, tmp_path / "b", f"checkpoint.load={step1_checkpoint}",
                                                   "parallel.tensor=1", "parallel.pipeline=1", "train.steps=2",
                                                   *WRPO))


def test_overlapped_gradient_reduce_trains_exactly_as_the_reduce_after_backward(small_data, tmp_path):
    """PP 2 x DP 2, two micro-batches per rank, buckets of 20k parameters (several per stage): the all-reduce bucket
    by bucket during the last backward gives the gradients of the all-reduce after it."""
    runs = {}
    for overlap in (False, True):
        run_dir = tmp_path / str(overlap)
        run_training(nproc=4, overrides=_overrides(
            small_data, run_dir, "train.steps=3", "parallel.tensor=1", "parallel.pipeline=2",
            "train.micro_batch_size=1", f"parallel.overlap_grad_reduce={str(overlap).lower()}",
            "parallel.ddp_bucket_size=20000"))
        runs[overlap] = read_metrics(run_dir)
    for plain, overlapped in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "grad_norm", "eval/loss"):
            if key in plain:
                assert overlapped[key] == pytest.approx(plain[key], rel=1e-6), (plain["step"], key)


def test_recomputed_activations_train_exactly_as_kept_ones(small_data, tmp_path):
    """PP 2: selective and full recomputation redo the forward in the backward pass and give the same losses and
    gradient norms as keeping the activations."""
    runs = {}
    for recompute in ("none", "selective", "full"):
        run_dir = tmp_path / recompute
        result = run_training(nproc=2, overrides=_overrides(
            small_data, run_dir, "train.steps=2", "parallel.tensor=1", "parallel.pipeline=2",
            f"train.recompute={recompute}"))
        runs[recompute] = read_metrics(run_dir)
        if recompute == "full":
            assert "of the layer recomputed" in result.stderr
    for recompute in ("selective", "full"):
        for kept, redone in zip(runs["none"], runs[recompute], strict=True):
            for key in ("loss", "grad_norm", "eval/loss"):
                if key in kept:
                    assert redone[key] == pytest.approx(kept[key], rel=1e-6), (recompute, kept["step"], key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without FP8")
def test_an_fp8_pivot_without_an_fp8_gpu_is_refused_with_the_reason(small_data, tmp_path):
    result = run_training(check=False, nproc=1, overrides=_overrides(
        small_data, tmp_path, "train.steps=2", "parallel.tensor=1", "parallel.pipeline=1", "train.precision=fp8"))
    assert result.returncode != 0
    assert ("train.precision: fp8 needs an FP8 GPU (Hopper, Ada) with Transformer Engine; here: no CUDA device"
            in result.stderr)


def test_a_null_micro_batch_size_takes_the_largest_that_fits(small_data, tmp_path):
    """DP 2, 8 pairs per step: 4 per rank, and the CPU's memory holds them all in one micro-batch."""
    result = run_training(nproc=2, overrides=_overrides(
        small_data, tmp_path, "train.steps=2", "parallel.tensor=1", "parallel.pipeline=1",
        "train.micro_batch_size=null", "train.global_batch_size=8"))
    assert "train.micro_batch_size null: 4 pair(s) per micro-batch, estimated" in result.stderr
    assert "train:\n  micro_batch_size: 4\n" in (tmp_path / "config.yaml").read_text()
    assert [m["step"] for m in read_metrics(tmp_path) if "loss" in m] == [1, 2]


# --------------------------------------------------------------------------------------------------------------------
# SFT (issue #19): a token-level loss through the pipeline, and the recipe's SFT -> preference step
SFT = ["loss.type=sft", "logging.eval_rows=true"]


@pytest.fixture(scope="module")
def sft_step1(small_data, tmp_path_factory) -> Path:
    """One SFT step at TP 1, saved, with the held-out log-probs of the random init (step 0) and after the step
    (step 1) dumped: the SFT layouts below start from its checkpoint (run_dir/ckpt)."""
    root = tmp_path_factory.mktemp("sft_step1")
    _one_step_at_tp1(small_data, root, "train.eval_on_start=true", *SFT)
    return root


@pytest.fixture(scope="module")
def sft_tp1_run(small_data, sft_step1, tmp_path_factory) -> list[dict]:
    return _continue(small_data, sft_step1 / "ckpt", tmp_path_factory.mktemp("sft_tp1"), nproc=1, tensor=1,
                     pipeline=1, extra=SFT)


def _assert_same_sft_losses(ours: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in ours] == [m["step"] for m in reference] == list(range(2, STEPS + 1))
    for got, want in zip(ours, reference):
        for key in ("loss", "token_accuracy", "grad_norm", *(("eval/loss", "eval/token_accuracy")
                                                             if "eval/loss" in want else ())):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)


def test_sft_trains_on_the_token_mean_of_the_global_batch(small_data, sft_step1, sft_tp1_run):
    assert all({"loss", "token_accuracy", "grad_norm"} <= m.keys() for m in sft_tp1_run)
    assert "rewards/accuracies" not in sft_tp1_run[0] and "logps/chosen" not in sft_tp1_run[0]
    assert sft_tp1_run[-1]["loss"] < sft_tp1_run[0]["loss"]  # the NLL goes down
    # eval/loss is the held-out NLL per response token: the dumped per-row sums over the dumped token counts
    rows = [json.loads(line) for line in (sft_step1 / "eval_rows" / "step_000001.jsonl").read_text().splitlines()]
    metrics = {m["step"]: m for m in read_metrics(sft_step1)}
    nll = -sum(row["policy_chosen_logps"] for row in rows) / sum(row["policy_chosen_lengths"] for row in rows)
    assert metrics[1]["eval/loss"] == pytest.approx(nll, rel=1e-5)
    assert sum(row["token_hits"] for row in rows) / sum(row["policy_chosen_lengths"] for row in rows) == \
        pytest.approx(metrics[1]["eval/token_accuracy"], rel=1e-5)


def test_sft_at_tp2_pp2_equals_tp1(small_data, sft_step1, sft_tp1_run, tmp_path):
    metrics = _continue(small_data, sft_step1 / "ckpt", tmp_path, nproc=4, tensor=2, pipeline=2, extra=SFT)
    _assert_same_sft_losses(metrics, sft_tp1_run)


def test_sft_gradient_is_the_global_token_mean_whatever_the_micro_batches_and_data_parallel_size(
    small_data, sft_step1, sft_tp1_run, tmp_path
):
    """The rows' responses differ in length; DP 2 with one unpacked row per micro-batch gives TP 1's steps (packed
    micro-batches of two rows): a mean of per-micro-batch or per-rank token means would not."""
    lengths = {json.loads(line)["chosen"][0]["content"].count(" ") for line in small_data.read_text().splitlines()}
    assert len(lengths) > 1
    metrics = _continue(small_data, sft_step1 / "ckpt", tmp_path, nproc=2, tensor=1, pipeline=1,
                        extra=[*SFT, "train.micro_batch_size=1", "data.packing=false"])
    _assert_same_sft_losses(metrics, sft_tp1_run)


def test_a_preference_run_from_an_sft_checkpoint_starts_at_step_0_with_it_as_the_pivot_init(
    small_data, sft_step1, tmp_path
):
    """DPO from the SFT checkpoint, on data whose cached ref_* scores describe another model (made up here): the
    run starts at step 0 and its reference is the SFT weights' own scores."""
    from safetensors.torch import load_file

    for name in ("prefs.jsonl", "eval.jsonl"):
        rows = [json.loads(line) for line in small_data.with_name(name).read_text().splitlines()]
        (tmp_path / name).write_text("".join(json.dumps(row | {"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0})
                                             + "\n" for row in rows))
    result = run_training(nproc=1, overrides=_overrides(
        tmp_path / "prefs.jsonl", tmp_path / "run", f"checkpoint.load={sft_step1 / 'ckpt'}",
        f"checkpoint.save={tmp_path / 'ckpt'}", "parallel.tensor=1", "parallel.pipeline=1", "train.steps=2",
        "loss.type=dpo"))
    assert "an SFT run's checkpoint (step 1): this dpo stage starts from them at step 0" in result.stderr
    assert "the cached ref_* scores of the train and eval data describe another model and are not used" in \
        result.stderr
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]  # a new run: step 0, a fresh data position and LR schedule
    assert metrics[0]["lr"] == pytest.approx(2e-3)  # a fresh schedule's first step: warmup 1 reaches train.lr
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the policy is its reference at step 1
    state = json.loads((tmp_path / "ckpt" / "iter_0000002" / "train_state.json").read_text())
    assert state["step"] == 2 and state["loss_type"] == "dpo" and state["sampler"]["consumed"] == 8
    # The reference (pivot-init scores) is the SFT model's log-probs, not the random init's
    scores = load_file(tmp_path / "ckpt" / "iter_0000002" / "pivot_init_scores.safetensors")

    def dumped(step: int) -> torch.Tensor:
        path = sft_step1 / "eval_rows" / f"step_{step:06d}.jsonl"
        return torch.tensor([json.loads(line)["policy_chosen_logps"] for line in path.read_text().splitlines()])

    torch.testing.assert_close(scores["eval/chosen_logps"], dumped(1), rtol=1e-5, atol=1e-4)
    assert (scores["eval/chosen_logps"] - dumped(0)).abs().max() > 0.1


# --------------------------------------------------------------------------------------------------------------------
# Packed micro-batches (data.packing, data.share_prompt) train exactly as padded ones
PACKING = {"unpacked": ["data.packing=false"], "packed": ["data.packing=true", "data.share_prompt=false"],
           "shared": ["data.packing=true", "data.share_prompt=true"]}
# 8 pairs per step in micro-batches of 2 (unpacked) or of 512 tokens (packed: 1 to 4 pairs each, varying per rank)
PACKED_BATCH = ["train.global_batch_size=8", "train.micro_batch_size=2"]
_EXPLANATION = "because the numbers given in the question add up to this and no other choice fits them".split()


@pytest.fixture(scope="module")
def varied_data(small_data, tmp_path_factory) -> Path:
    """The small rows (train and eval.jsonl) whose responses add 0 to 60 words of explanation after the answer:
    prompts of 17 to 119 tokens and responses of a few to about a hundred (some cut to model.seq_length, as
    unpacked)."""
    directory = tmp_path_factory.mktemp("varied")
    for name, source in (("prefs.jsonl", small_data), ("eval.jsonl", small_data.with_name("eval.jsonl"))):
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        for index, row in enumerate(rows):
            for offset, side in enumerate(("chosen", "rejected")):
                words = (_EXPLANATION * 4)[:(index * 7 + offset * 13) % 61]
                row[side][0]["content"] += (" " + " ".join(words)) if words else ""
        (directory / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory / "prefs.jsonl"


@pytest.fixture(scope="module")
def varied_step1_checkpoint(varied_data, tmp_path_factory) -> Path:
    return _one_step_at_tp1(varied_data, tmp_path_factory.mktemp("varied_step1"), *PACKED_BATCH, *PACKING["unpacked"])


@pytest.fixture(scope="module")
def varied_unpacked_tp1(varied_data, varied_step1_checkpoint, tmp_path_factory) -> list[dict]:
    return _continue(varied_data, varied_step1_checkpoint, tmp_path_factory.mktemp("varied_tp1"), nproc=1, tensor=1,
                     pipeline=1, extra=[*PACKED_BATCH, *PACKING["unpacked"]])


def _assert_packed_equals_unpacked(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(2, STEPS + 1))
    for packed, unpacked in zip(got, want):
        keys = [key for key in unpacked if key.startswith(("loss", "grad_norm", "rewards/", "logps/", "eval/"))]
        assert len(keys) >= 8 and set(keys) <= packed.keys()
        for key in keys:
            assert packed[key] == pytest.approx(unpacked[key], rel=1e-5, abs=1e-5), (unpacked["step"], key)


@pytest.mark.parametrize("mode", ["packed", "shared"])
def test_packed_micro_batches_train_as_unpacked_at_tp1(mode, varied_data, varied_step1_checkpoint,
                                                       varied_unpacked_tp1, tmp_path):
    result_dir = tmp_path / mode
    metrics = _continue(varied_data, varied_step1_checkpoint, result_dir, nproc=1, tensor=1, pipeline=1,
                        extra=[*PACKED_BATCH, *PACKING[mode]])
    _assert_packed_equals_unpacked(metrics, varied_unpacked_tp1)
    # fewer tokens computed: the throughput counts real tokens, the same pairs but the prompt once when shared
    assert all(m["tokens_per_sec"] > 0 for m in metrics)


@pytest.mark.parametrize("mode", ["packed", "shared"])
def test_packed_micro_batches_at_tp2_pp2_dp2_train_as_unpacked_at_tp1(mode, varied_data, varied_step1_checkpoint,
                                                                      varied_unpacked_tp1, tmp_path):
    """8 ranks: the data-parallel ranks' pairs pack into different numbers of micro-batches, agreed per step."""
    metrics = _continue(varied_data, varied_step1_checkpoint, tmp_path, nproc=8, tensor=2, pipeline=2,
                        extra=[*PACKED_BATCH, *PACKING[mode]])
    _assert_packed_equals_unpacked(metrics, varied_unpacked_tp1)
