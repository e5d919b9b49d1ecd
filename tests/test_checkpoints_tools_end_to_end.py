"""The three commands as a user runs them: hf_to_mcore.py, training from the checkpoint with the real entry point,
mcore_to_hf.py of the trained pivot, verify.py. With a tiny tied-embedding Llama at PP 2 (the embedding lives
on the first and the last stage) and with the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import free_port
from tests.launcher import REPO, read_metrics, run_training
from tests.tiny_hf import build_tiny_hf

pytestmark = pytest.mark.distributed
TOOLS = REPO / "checkpoints_tools"


def run_tool(script: str, *args: str, nproc: int = 1, expect_rc: int = 0) -> str:
    """A checkpoints_tools script as a user runs it (python, or torchrun for nproc > 1); its stdout + stderr."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([*launcher, str(TOOLS / script), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == expect_rc, f"{script} {args}: rc {result.returncode}\n{output[-6000:]}"
    return output


def _data(tmp_path: Path, rows: int) -> Path:
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join((REPO / "launch/data/tiny_prefs_train.jsonl").read_text().splitlines()[:rows]) + "\n")
    return path


def _train(*, ckpt: Path, data: Path, run_dir: Path, nproc: int, extra: list[str]) -> list[dict]:
    run_training(nproc=nproc, overrides=[
        f"checkpoint.load={ckpt}", f"checkpoint.save={run_dir / 'ckpt'}", f"run_dir={run_dir}", f"data.path={data}",
        f"data.eval_path={data}", "train.eval_interval=null", "loss.type=dpo", "train.warmup_steps=0",
        "train.lr_schedule=constant", "parallel.tensor=1", *extra])
    return read_metrics(run_dir)


def test_the_documented_command_at_pp2_trains_a_converted_tied_model_that_exports_exactly(tmp_path):
    """A tied tiny Llama (the vocabulary of the default config's Mistral tokenizer, which the checkpoint does not
    carry) converted, trained 2 steps at PP 2 by the plain command (the default config's tiny model is replaced by
    the checkpoint's), exported: HF's logits equal the trained pivot's at PP 2, where the tied embedding lives on the
    first and the last stage. (The same at TP 2 x PP 2 on 4 ranks passes too, ~100 s on 2 cores: kept out.)"""
    hf = build_tiny_hf(tmp_path / "hf", family="llama_tied", vocab_size=32000)
    run_tool("hf_to_mcore.py", "--hf", str(hf), "--out", str(tmp_path / "ckpt"), "--tp", "2", "--pp", "2")
    data = _data(tmp_path, 8)
    run_training(nproc=2, overrides=[
        f"checkpoint.load={tmp_path / 'ckpt'}", "parallel.tensor=1", "parallel.pipeline=2", f"data.path={data}",
        f"data.eval_path={data}", f"run_dir={tmp_path / 'run'}", f"checkpoint.save={tmp_path / 'run' / 'ckpt'}",
        "train.steps=2", "train.warmup_steps=0", "train.global_batch_size=4", "train.lr=1e-2", "model.seq_length=256"])
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]
    run_tool("mcore_to_hf.py", "--ckpt", str(tmp_path / "run" / "ckpt"), "--out", str(tmp_path / "back"))
    exported, original = load_file(tmp_path / "back" / "model.safetensors"), load_file(hf / "model.safetensors")
    assert "lm_head.weight" not in exported and exported.keys() == original.keys()
    assert not torch.equal(exported["model.embed_tokens.weight"], original["model.embed_tokens.weight"])  # trained
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["hidden_size"] == 64  # not tiny_cpu.yaml's 128
    out = run_tool("verify.py", "--hf", str(tmp_path / "back"), "--ckpt", str(tmp_path / "run" / "ckpt"),
                   "--pp", "2", "--tolerance", "1e-4", nproc=2)
    assert "pivot at TP 1 x PP 2" in out and "OK" in out


REFUSED_CONFIGS = {  # name -> (transformers config class, its fields, what the refusal names)
    "unknown-rope-type": ("LlamaConfig", dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                original_max_position_embeddings=256)),
                          "rope scaling type 'yarn' (rope_parameters / rope_scaling; supported: default, linear, "
                          "llama3)"),
    "unsupported-field": ("Gemma3TextConfig", dict(vocab_size=262144, hidden_size=640, num_hidden_layers=18,
                                                   attn_logit_softcapping=50.0),  # Gemma-2's soft-capping
                          "attn_logit_softcapping=50.0 (the pivot has no such term; supported: None)"),
}


@pytest.mark.parametrize("name", REFUSED_CONFIGS)
def test_an_unsupported_config_is_refused_naming_the_file_and_the_field(tmp_path, name):
    import transformers

    config_class, fields, fragment = REFUSED_CONFIGS[name]
    model_dir = tmp_path / "model"
    getattr(transformers, config_class)(**fields).save_pretrained(model_dir)  # config.json only: refused first
    out = run_tool("hf_to_mcore.py", "--hf", str(model_dir), "--out", str(tmp_path / "x"), expect_rc=2)
    assert f"{model_dir / 'config.json'}: the converter cannot honour: {fragment}" in out
    assert not (tmp_path / "x").exists()


def test_a_tensor_whose_shape_contradicts_config_json_is_refused_naming_it(tmp_path):
    """The conversion writes each tensor into the pivot as it goes; a misfit is still named by its HF name."""
    from safetensors.torch import save_file

    hf_dir = build_tiny_hf(tmp_path / "hf", family="llama")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.post_attention_layernorm.weight"] = torch.ones(65)  # hidden_size is 64
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    out = run_tool("hf_to_mcore.py", "--hf", str(hf_dir), "--out", str(tmp_path / "x"), expect_rc=2)
    assert f"{hf_dir}: model.layers.1.post_attention_layernorm.weight has shape (65,); config.json implies (64,)" in out
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_real_smollm2_converts_matches_hf_trains_and_comes_back(smollm2_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_tool("hf_to_mcore.py", "--hf", str(smollm2_dir), "--out", str(ckpt), "--pp", "2")
    out = run_tool("verify.py", "--hf", str(smollm2_dir), "--ckpt", str(ckpt), "--tolerance", "2e-4")
    print(next(line for line in out.splitlines() if "max |delta logit|" in line))  # for the record (pytest -s)
    assert f"tokens from the tokenizer of {smollm2_dir}" in out and "OK" in out
    metrics = _train(ckpt=ckpt, data=_data(tmp_path, 4), run_dir=tmp_path / "run", nproc=2,
                     extra=["parallel.pipeline=2", "train.steps=2", "train.lr=1e-5", "train.min_lr=1e-5",
                            "train.micro_batch_size=1", "train.global_batch_size=2", "model.seq_length=160"])
    print("SmolLM2 DPO:", [(m["step"], round(m["loss"], 4), round(m.get("eval/loss", float("nan")), 4))
                           for m in metrics])
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the pivot init is the reference: log 2
    assert metrics[-1]["eval/loss"] < 0.69  # the 4 pairs, after 2 steps on them
    back = tmp_path / "back"
    run_tool("mcore_to_hf.py", "--ckpt", str(tmp_path / "run" / "ckpt"), "--out", str(back))
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in back.iterdir()}
    out = run_tool("verify.py", "--hf", str(back), "--ckpt", str(tmp_path / "run" / "ckpt"), "--tolerance", "2e-4")
    assert f"tokens from the tokenizer of {back}" in out and "OK" in out


@pytest.mark.slow
def test_real_gemma3_270m_converts_matches_hf_past_its_window_trains_and_comes_back(gemma3_dir, tmp_path):
    """Gemma-3-270M: its one KV head refuses TP 2 by name; at TP 1 the pivot equals transformers on the default
    prompts and on one of ~600 tokens, past the 512-token window of its local layers; 2 DPO steps with its
    tokenizer and the named Gemma chat template (the base model ships none); the export keeps the tokenizer."""
    out = run_tool("hf_to_mcore.py", "--hf", str(gemma3_dir), "--out", str(tmp_path / "x"), "--tp", "2",
                   expect_rc=2)
    assert "--tp 2 --pp 1 cannot hold this model: model.num_query_groups (1) must be divisible by " \
           "parallel.tensor (2)" in out
    ckpt = tmp_path / "ckpt"
    run_tool("hf_to_mcore.py", "--hf", str(gemma3_dir), "--out", str(ckpt))
    prompts = tmp_path / "prompts.txt"
    long = " ".join(f"Step {i}: the running total is {i * (i + 1) // 2}, and {i} is {'odd' if i % 2 else 'even'}."
                    for i in range(1, 31))
    prompts.write_text("\n".join(["The capital of France is", "def fibonacci(n):", long]) + "\n")
    out = run_tool("verify.py", "--hf", str(gemma3_dir), "--ckpt", str(ckpt), "--prompts", str(prompts),
                   "--tolerance", "5e-4")
    print(next(line for line in out.splitlines() if "max |delta logit|" in line))  # for the record (pytest -s)
    assert f"tokens from the tokenizer of {gemma3_dir}" in out and "OK" in out
    tokens = int(out.split(" tokens)")[0].rsplit("(", 1)[1])
    assert tokens > 512 + 20  # the long prompt runs past the window
    metrics = _train(ckpt=ckpt, data=_data(tmp_path, 4), run_dir=tmp_path / "run", nproc=1,
                     extra=["parallel.pipeline=1", "train.steps=2", "train.lr=1e-5", "train.min_lr=1e-5",
                            "train.micro_batch_size=1", "train.global_batch_size=2", "model.seq_length=160",
                            "tokenizer.chat_template=gemma"])
    print("Gemma-3-270M DPO:", [(m["step"], round(m["loss"], 4), round(m.get("eval/loss", float("nan")), 4))
                                for m in metrics])
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the pivot init is the reference: log 2
    assert metrics[-1]["eval/loss"] < 0.69  # the 4 pairs, after 2 steps on them
    back = tmp_path / "back"
    run_tool("mcore_to_hf.py", "--ckpt", str(tmp_path / "run" / "ckpt"), "--out", str(back))
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in back.iterdir()}
    # The trained pivot's logits drift further from transformers' in absolute terms (8.8e-4 measured in CI, 1.0e-4
    # before training: summation-order noise grows with the weights 2 steps at lr 1e-5 moved), while its per-token
    # log-probs, what the trainer reads, stay within 1.4e-5 either way. A conversion defect moves logits by O(1).
    out = run_tool("verify.py", "--hf", str(back), "--ckpt", str(tmp_path / "run" / "ckpt"), "--prompts",
                   str(prompts), "--tolerance", "3e-3")
    print("trained, exported:", next(line for line in out.splitlines() if "max |delta logit|" in line))
    assert f"tokens from the tokenizer of {back}" in out and "OK" in out
    assert float(re.search(r"log-prob per token: max \|delta\| ([0-9.e+-]+)", out).group(1)) < 5e-5
