"""Each CPU-capable benchmark runs end to end at its smallest size and writes a JSON result with its keys and finite,
positive ratios. Nothing here asserts a speed: on CPU the figures only prove the scripts work.

The three cheapest take ~50 s together on 2 cores. online_overlap is left out (the online job with its source rank
takes about a minute); run it by hand: ``python -m benchmarks.online_overlap`` (its CPU proof run is in RESULTS.md).
vs_trl runs as a step of the GPU smoke kit's dry run (~85 s for the four steps), the last test here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(module: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{module}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--out", str(out), "--workdir",
                             str(tmp_path / module), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == module
    assert {"date", "command", "device", "torch", "versions", "git_commit"} <= set(report["environment"])
    return report


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.distributed
def test_pivot_step_measures_each_precision_and_reports_fp8_as_unavailable_without_an_fp8_gpu(tmp_path):
    report = _run("pivot_step", tmp_path, "--precision", "fp32", "fp8", "--seq-length", "32", "--steps", "2",
                  "--warmup-steps", "1")
    measured, fp8 = report["results"]
    assert measured["precision"] == "fp32" and measured["status"] == "measured"
    if not torch.cuda.is_available():
        assert fp8["precision"] == "fp8" and fp8["status"].startswith("unavailable: no CUDA device")
    for key in ("step_seconds", "tokens_per_sec", "model_tflops_per_sec", "speedup_vs_fp32"):
        assert _positive(measured[key]), key


@pytest.mark.distributed
def test_infifpo_vs_dpo_gives_a_step_time_ratio(tmp_path):
    report = _run("infifpo_vs_dpo", tmp_path, "--seq-length", "32", "--steps", "2", "--warmup-steps", "1")
    assert [result["loss"] for result in report["results"]] == ["dpo", "infifpo"]
    assert _positive(report["step_time_ratio_infifpo_over_dpo"])
    assert _positive(report["forward_backward_ratio_infifpo_over_dpo"])


@pytest.mark.distributed
def test_packing_compares_unpacked_packed_and_shared_pairs_per_second(tmp_path):
    report = _run("packing", tmp_path, "--rows", "16", "--global-batch-size", "4", "--micro-batch-size", "2",
                  "--steps", "2", "--warmup-steps", "1")
    assert [result["mode"] for result in report["results"]] == ["unpacked", "packed", "shared"]
    profile = report["data_profile"]
    assert profile["rows"] == 16 and 0.3 < profile["padding_share_unpacked"] < 0.7  # 39.7 % in these rows
    assert profile["shared_prompt_tokens_share"] < 1 - profile["padding_share_unpacked"]
    for result in report["results"]:
        for key in ("pairs_per_sec", "useful_tokens_per_sec", "pairs_per_sec_vs_unpacked"):
            assert _positive(result[key]), (result["mode"], key)


def test_source_scoring_compares_precisions_per_token(tmp_path):
    report = _run("source_scoring", tmp_path, "--rows", "2", "--prompt-words", "8", "--response-words", "8",
                  "--repeats", "1")
    reference, bf16 = report["results"]
    assert reference["precision"] == "fp32" and bf16["precision"] == "bf16"
    assert _positive(bf16["speedup_vs_fp32"]) and _positive(bf16["tokens_per_sec"])
    assert 0 < bf16["mean_abs_delta_logp"] <= bf16["max_abs_delta_logp"] < 1.0


@pytest.mark.distributed
def test_the_gpu_smoke_kit_runs_every_step_as_a_dry_run_on_cpu(tmp_path):
    """``bash benchmarks/gpu/smoke.sh --dry-run``: the one command of the GPU kit, on CPU (gloo, tiny shape), runs
    each step and writes what the device tool brings back: at most 8 flat files, a JSON per step and the summary."""
    from benchmarks.smoke import STEPS, source_fingerprint

    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    result = subprocess.run(["bash", "benchmarks/gpu/smoke.sh", "--dry-run", "--out", str(out), "--budget-seconds",
                             "1500", "--workdir", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    files = sorted(path.name for path in out.iterdir())
    assert files == sorted([*(f"{name}.json" for name in STEPS), "smoke.json", "smoke.log"]) and len(files) <= 8
    assert all(path.is_file() for path in out.iterdir())
    report = json.loads((out / "smoke.json").read_text())
    assert report["ok"] and report["source_fingerprint"] == source_fingerprint()
    assert [step["name"] for step in report["steps"]] == list(STEPS)
    assert all(step["status"] == "ok" for step in report["steps"])
    figures = {step["name"]: step["figures"] for step in report["steps"]}
    trainer = json.loads((out / "trainer.json").read_text())
    assert trainer["steps"] == 20 and [m["step"] for m in trainer["metrics"]] == list(range(1, 21))
    assert "parallel.distributed_optimizer=true" in trainer["overrides"]
    assert all(math.isfinite(m["loss"]) for m in trainer["metrics"]) and _positive(figures["trainer"]["tokens_per_sec"])
    assert figures["pivot_step"]["fp8"]["status"].startswith("unavailable")
    assert _positive(figures["pivot_step"][report["size"]["precision"]]["tokens_per_sec"])
    assert _positive(figures["vs_trl"]["tokens_per_sec_ratio_ours_over_trl"])
    assert 0 < figures["source_scoring"]["bf16"]["mean_abs_delta_logp"] < 0.1
