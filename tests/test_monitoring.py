import importlib.util
import json
import logging
import math
import sys
import time
import types

import pytest
import torch

from infifpo_mcore import monitoring
from infifpo_mcore.config import ConfigError, load_config
from infifpo_mcore.losses import LossOptions
from infifpo_mcore.monitoring import (
    MetricsLogger,
    ProgressBar,
    Throughput,
    WandbSettings,
    describe_reference,
    format_summary,
    gpt_flops_per_token,
    gpu_stats,
    mfu,
    peak_bf16_flops,
    summarize_run,
)


def step_metrics(step: int) -> dict[str, float]:
    """Distinct, non-round values per step so a mixed-up step or key shows."""
    return {
        "loss": 0.7 - 0.01 * step, "lr": 1e-3 * step, "grad_norm": 1.5 + step,
        "rewards/chosen": 0.1 * step, "rewards/rejected": -0.2 * step, "rewards/accuracies": 0.25 * (step % 4),
        "rewards/margins": 0.3 * step, "logps/chosen": -10.0 - step, "logps/rejected": -12.0 - step,
        "tokens_per_sec": 1000.0 + step,
    }


def read_jsonl(path):
    def reject_non_standard(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return [json.loads(line, parse_constant=reject_non_standard) for line in path.read_text().splitlines()]


def test_metrics_logger_writes_one_flushed_json_line_per_step(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir=run_dir, enabled=True, tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step=step, metrics=step_metrics(step))
    # Read before close: every line must already be on disk (a crash loses nothing).
    records = read_jsonl(run_dir / "metrics.jsonl")
    logger.close()

    assert [record["step"] for record in records] == [1, 2, 3]
    for record in records:
        assert set(step_metrics(1)) | {"step"} <= record.keys()
        expected = step_metrics(record["step"])
        assert {name: record[name] for name in expected} == pytest.approx(expected)
    assert logger.metrics_path == run_dir / "metrics.jsonl"


def test_wandb_gets_the_same_scalars_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written to <run_dir>/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = WandbSettings(project="infifpo-test", config={"loss": {"beta": 0.1}})
    with MetricsLogger(run_dir=tmp_path, enabled=True, tensorboard=False, wandb=settings) as logger:
        logger.log(step=1, metrics={"rewards/margins": 0.123456})
    run_id = (tmp_path / "wandb_run_id").read_text()
    with MetricsLogger(run_dir=tmp_path, enabled=True, tensorboard=False, wandb=settings) as logger:
        logger.log(step=2, metrics={"rewards/margins": 0.654321})
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    # wandb's service process writes the run file; on a loaded machine (the full suite) its last records have been
    # seen to land a moment after finish() returned
    for _ in range(60):
        records = b"".join(path.read_bytes()
                           for path in (tmp_path / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
        if b"0.654321" in records:
            break
        time.sleep(0.5)
    assert b"rewards/margins" in records and b"0.123456" in records and b"0.654321" in records


def test_wandb_asked_for_but_not_installed_is_a_config_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb_project: set, but wandb is not installed"):
        load_config(overrides=["logging.wandb_project=my-project"])


def test_metrics_logger_appends_on_resume_and_writes_strict_json(tmp_path):
    with MetricsLogger(run_dir=tmp_path, enabled=True, tensorboard=False) as logger:
        logger.log(step=1, metrics={"loss": 0.5})
    with MetricsLogger(run_dir=tmp_path, enabled=True, tensorboard=False) as logger:
        logger.log(step=2, metrics={"loss": math.nan, "grad_norm": math.inf, "lr": torch.tensor(0.25)})

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": None, "grad_norm": None, "lr": 0.25}]


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(run_dir=tmp_path, enabled=True, tensorboard=True) as logger:
        for step in (1, 2):
            logger.log(step=step, metrics=step_metrics(step))

    event_files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(step_metrics(1)) <= set(events.Tags()["scalars"])
    losses = [(event.step, event.value) for event in events.Scalars("loss")]
    assert losses == [(1, pytest.approx(0.69)), (2, pytest.approx(0.68))]


def test_missing_tensorboard_warns_once_and_still_writes_jsonl(tmp_path, monkeypatch, caplog):
    # A None entry in sys.modules makes `import torch.utils.tensorboard` raise ImportError.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.WARNING, logger=monitoring.__name__):
        with MetricsLogger(run_dir=tmp_path, enabled=True, tensorboard=True) as logger:
            logger.log(step=1, metrics={"loss": 0.5})
            logger.log(step=2, metrics={"loss": 0.4})

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tensorboard" in warnings[0].getMessage()
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    assert not (tmp_path / "tensorboard").exists()


def test_disabled_logger_creates_no_files(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir=run_dir, enabled=False, tensorboard=True) as logger:
        logger.log(step=1, metrics=step_metrics(1))
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_shows_loss_accuracy_and_throughput_on_stderr(capsys):
    bar = ProgressBar(total=4, enabled=True, initial=1)
    bar.update({"loss": 0.69314, "rewards/accuracies": 0.5, "tokens_per_sec": 12345.6})
    bar.update({"loss": 0.61234, "rewards/accuracies": 0.75, "tokens_per_sec": 23456.7})
    bar.close()

    captured = capsys.readouterr()
    assert captured.out == ""
    final = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert "3/4" in final
    assert "loss=0.6123" in final and "acc=0.75" in final and "tok/s=23,457" in final


def test_disabled_progress_bar_prints_nothing(capsys):
    bar = ProgressBar(total=3, enabled=False)
    bar.update({"loss": 0.5})
    bar.close()
    assert capsys.readouterr().err == ""


def test_throughput_per_step_and_run_mean():
    times = iter([10.0, 12.0, 13.0, 20.0, 24.0])
    throughput = Throughput(clock=lambda: next(times))  # constructed at t=10

    assert throughput.step(tokens=400) == pytest.approx(200.0)  # 400 tokens in 2 s
    assert throughput.step(tokens=300) == pytest.approx(300.0)  # 300 tokens in 1 s
    throughput.restart_clock()  # t=20: the pause 13 -> 20 (e.g. eval) does not count
    assert throughput.step(tokens=100) == pytest.approx(25.0)   # 100 tokens in 4 s
    assert throughput.total_tokens == 800
    assert throughput.tokens_per_sec == pytest.approx(800 / 7)


def test_mfu_is_achieved_over_peak_flops():
    assert mfu(flops_per_token=2e9, tokens_per_sec=1e4, peak_flops=1e14) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(flops_per_token=2e9, tokens_per_sec=1e4, peak_flops=0.0)


def test_peak_flops_table_matches_device_names():
    assert peak_bf16_flops(device_name="NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops(device_name="NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops(device_name="NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops(device_name="cpu") is None


@pytest.mark.parametrize("swiglu", [True, False])
def test_gpt_flops_per_token_matches_a_hand_count(swiglu):
    # L=2, h=8, f=16, 4 heads of width 2, 2 query groups -> K and V are 2 * 2 = 4 wide; V=10, s=4.
    # Forward FLOPs of one token, one matmul at a time (2 FLOPs per multiply-add):
    q_proj, k_proj, v_proj, out_proj = 2 * 8 * 8, 2 * 8 * 4, 2 * 8 * 4, 2 * 8 * 8
    scores, weighted_values = 2 * 4 * 8, 2 * 4 * 8            # q . k over 4 positions, 4 heads x width 2
    mlp = (2 * 8 * 16) * (3 if swiglu else 2)                   # gate + up + down, or up + down
    logits = 2 * 8 * 10
    forward = 2 * (q_proj + k_proj + v_proj + out_proj + scores + weighted_values + mlp) + logits
    expected = 3 * forward                                      # backward costs twice the forward

    flops = gpt_flops_per_token(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=4,
                                num_query_groups=2, vocab_size=10, seq_length=4, swiglu=swiglu)
    assert flops == pytest.approx(expected)
    assert expected == (8160 if swiglu else 6624)  # the hand count itself, written out once


def test_gpt_flops_per_token_with_a_head_size_of_its_own():
    # As above but 4 heads of width 3 (Gemma / Qwen3 / Mistral-Nemo: head_dim != h / a): Q 12 wide, K and V 6 wide
    q_proj, k_proj, v_proj, out_proj = 2 * 8 * 12, 2 * 8 * 6, 2 * 8 * 6, 2 * 12 * 8
    scores, weighted_values = 2 * 4 * 12, 2 * 4 * 12
    mlp, logits = 2 * 8 * 16 * 3, 2 * 8 * 10
    expected = 3 * (2 * (q_proj + k_proj + v_proj + out_proj + scores + weighted_values + mlp) + logits)
    flops = gpt_flops_per_token(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=4,
                                num_query_groups=2, vocab_size=10, seq_length=4, swiglu=True, head_dim=3)
    assert flops == pytest.approx(expected) and expected == 9696


@pytest.fixture
def fresh_nvml():
    monitoring._nvml.cache_clear()
    yield
    monitoring._nvml.cache_clear()


def test_gpu_stats_without_cuda_is_empty(monkeypatch, fresh_nvml):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_stats() == {}


def test_gpu_stats_without_nvidia_ml_py_is_empty(monkeypatch, fresh_nvml):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert gpu_stats() == {}


def test_gpu_stats_without_an_nvml_driver_is_empty(monkeypatch, fresh_nvml, caplog):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pytest.skip("this machine has a working NVML")
    except pynvml.NVMLError:
        pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO):
        assert gpu_stats() == {}
    assert not caplog.records  # quiet: nothing at INFO or above


def fake_pynvml(*, handles_by_uuid: dict[str, str]) -> types.ModuleType:
    """A stand-in for nvidia-ml-py on one device whose utilisation is unsupported (as on a MIG slice)."""
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def utilization_rates(handle):
        raise NVMLError("Not Supported")

    module.NVMLError = NVMLError
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetHandleByUUID = lambda uuid: handles_by_uuid[uuid]
    module.nvmlDeviceGetUtilizationRates = utilization_rates
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    module.nvmlDeviceGetPowerUsage = lambda handle: 250_500  # milliwatts
    return module


def test_gpu_stats_reads_nvml_for_the_cuda_device_by_uuid(monkeypatch, fresh_nvml):
    uuids = {0: "11111111-aaaa", 1: "22222222-bbbb"}  # CUDA index -> UUID as torch reports it
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(handles_by_uuid={"GPU-22222222-bbbb": "handle-1"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid=uuids[index]))

    stats = gpu_stats(device=1)
    assert stats == {"gpu/memory_used_gib": pytest.approx(3.0), "gpu/memory_total_gib": pytest.approx(80.0),
                     "gpu/power_w": pytest.approx(250.5)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_stats_on_a_gpu(fresh_nvml):
    pytest.importorskip("pynvml")
    stats = gpu_stats()
    assert {"gpu/memory_used_gib", "gpu/memory_total_gib"} <= stats.keys()
    assert 0 < stats["gpu/memory_used_gib"] <= stats["gpu/memory_total_gib"]
    assert 0 <= stats.get("gpu/utilization_pct", 0) <= 100


def test_summary_reports_the_numbers(tmp_path):
    history = [step_metrics(step) for step in range(1, 11)]
    summary = summarize_run(
        history=history, accuracy_window=4, tokens_per_sec=1234.5, wall_seconds=83.4,
        reference=describe_reference(loss_type="infifpo", num_sources=2, options=LossOptions(
            beta=0.1, length_norm=True, clip=True, fusion="max_margin", include_pivot_init=True)),
        checkpoint_path="runs/tiny/checkpoints/iter_0000010", metrics_path=str(tmp_path / "metrics.jsonl"),
        mfu=0.123,
    )
    # accuracies of steps 7..10 are 0.75, 0.0, 0.25, 0.5
    assert summary.reward_accuracy == pytest.approx(0.375)
    text = format_summary(summary)

    assert "steps run:" in text and " 10\n" in text
    assert "0.6900 -> 0.6000" in text
    assert "0.375 (mean of last 4 steps)" in text
    assert "1,234.5" in text
    assert "12.3%" in text
    assert "1m 23.4s" in text
    assert "reference:" in text and "fused from 2 sources + pivot init (fusion=max_margin)" in text
    assert "runs/tiny/checkpoints/iter_0000010" in text
    assert str(tmp_path / "metrics.jsonl") in text


def test_the_summary_of_an_sft_run_reports_its_token_accuracy():
    history = [{"loss": 3.0 - step / 10, "token_accuracy": step / 10} for step in range(1, 6)]
    summary = summarize_run(history=history, accuracy_window=2, tokens_per_sec=1.0, wall_seconds=1.0,
                            reference="none", checkpoint_path=None, metrics_path=None,
                            eval_metrics={"eval/loss": 2.5, "eval/token_accuracy": 0.25})
    text = format_summary(summary)
    assert "token accuracy:" in text and "0.450 (mean of last 2 steps)" in text
    assert "held-out:" in text and "loss 2.5000, token accuracy 0.250" in text
    assert "reward accuracy" not in text


def test_summary_of_a_run_without_steps():
    summary = summarize_run(history=[], tokens_per_sec=0.0, wall_seconds=1.0, reference="pivot init (DPO)",
                            checkpoint_path=None, metrics_path=None)
    text = format_summary(summary)
    assert "n/a (no steps run)" in text and "none saved" in text and "MFU" not in text


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"loss_type": "dpo", "num_sources": 0}, "pivot init (DPO) — the data carries no source scores"),
    ({"loss_type": "ipo", "num_sources": 3}, "pivot init (IPO) — the 3 source scores in the data are not used"),
    ({"loss_type": "infifpo", "num_sources": 1}, "fused from 1 source (fusion=sum)"),
    ({"loss_type": "fpo", "num_sources": 2}, "fused from 2 sources (fusion=mean)"),
])
def test_describe_reference(kwargs, expected):
    options = LossOptions(beta=0.1, length_norm=True, clip=True, fusion="sum", include_pivot_init=False)
    assert describe_reference(options=options, **kwargs) == expected
