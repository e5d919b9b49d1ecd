"""HF -> Megatron -> logits equal HF's at TP 1, TP 2 and PP 2 for every family; Megatron -> HF is bit-exact.

One conversion per family (TP 1 / PP 1, one process), then the checkpoint loads at each layout through
dist_checkpointing, runs the real pipeline schedule and is compared with transformers on the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from safetensors.torch import load_file

from tests.distributed import run_distributed
from tests.tiny_hf import LONGEST, TINY_FAMILIES, build_tiny_hf

pytestmark = pytest.mark.distributed
NAMES = list(TINY_FAMILIES)
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}  # tp1 runs in the converting process
SHARDED = "qwen2"  # exported with a small shard limit: several files and an index
# Past every tiny family's sliding window and original RoPE context (tests/tiny_hf.py); right-padded into one batch
LENGTHS = (LONGEST, 9, 33)


def _tokens(vocab_size: int):
    from checkpoints_tools.comparison import padded_batch

    generator = torch.Generator().manual_seed(7)
    return padded_batch([torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in LENGTHS])


def _compare_all(ctx, *, root: str, layout: str) -> None:
    """Every family's checkpoint at this process layout vs HF; results written by the rank that holds them."""
    from checkpoints_tools.comparison import compare, hf_logits, megatron_logits
    from checkpoints_tools.conversion import load_pivot

    for name in NAMES:
        family_dir = Path(root) / name
        chunks, card, _ = load_pivot(ckpt=family_dir / "ckpt", ctx=ctx)
        tokens, lengths = _tokens(card.model.vocab_size)
        ours = megatron_logits(chunks, tokens=tokens, vocab_size=card.model.vocab_size, ctx=ctx)
        if ours is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            result = compare(reference=hf_logits(family_dir / "hf", tokens=tokens), ours=ours, tokens=tokens,
                             lengths=lengths)
            (family_dir / f"{layout}.json").write_text(json.dumps(asdict(result)))


def _convert_export_compare(ctx, *, root: str) -> None:
    from checkpoints_tools.conversion import convert_hf_to_mcore, export_mcore_to_hf, plan_conversion

    for name in NAMES:
        family_dir = Path(root) / name
        plan = plan_conversion(hf_dir=family_dir / "hf", tensor=2, pipeline=2)
        convert_hf_to_mcore(plan=plan, out=family_dir / "ckpt", ctx=ctx)
        export_mcore_to_hf(ckpt=family_dir / "ckpt", out=family_dir / "back", ctx=ctx,
                           max_shard_bytes=100_000 if name == SHARDED else 2**30)
    _compare_all(ctx, root=root, layout="tp1")
    _export_a_pivot_made_here(ctx, root=Path(root))


# Pivots made here (no HF origin) and the HF family each exports as (checkpoints_tools.hf_config.llama_config_for)
NATIVE = {
    "native": ("LlamaForCausalLM", dict(rotary_base=5000.0, tie_embeddings=False)),
    # a head size of its own, q/k norms and Llama 3's RoPE scaling: a Qwen3 config with head_dim and rope_parameters
    "native_qwen3": ("Qwen3ForCausalLM", dict(
        kv_channels=32, qk_layernorm=True, rotary_base=500000.0, rope_scaling="llama3", rope_scaling_factor=8.0,
        rope_original_max_position_embeddings=64)),
    "native_mistral": ("MistralForCausalLM", dict(sliding_window=16, tie_embeddings=False)),  # a window in every layer
}


def _export_a_pivot_made_here(ctx, *, root: Path) -> None:
    """Freshly initialised pivots (no HF origin: the card has no hf_config) saved as the trainer saves them, exported
    with a generated config.json, against which HF's logits are compared."""
    from checkpoints_tools.comparison import compare, hf_logits, megatron_logits
    from checkpoints_tools.conversion import export_mcore_to_hf
    from infifpo_mcore import checkpointing, pivot_card
    from infifpo_mcore.config import ModelConfig, TokenizerConfig
    from infifpo_mcore.model import build_pivot, build_transformer_config

    for name, (_, fields) in NATIVE.items():
        model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=96, vocab_size=250, norm_epsilon=1e-6, **fields)
        config = build_transformer_config(model=model, tensor=1, pipeline=1, precision="fp32")
        chunks = build_pivot(model=model, config=config, vocab_size=256, device=ctx.device)
        card = pivot_card.build_card(model=model, tokenizer=TokenizerConfig(), hf_config=None)  # the pkg:// default
        checkpointing.save_checkpoint(root=root / name / "ckpt", step=3, model_chunks=chunks, optimizer=None,
                                      train_state=None, init_scores=None,
                                      write_extra=lambda directory: pivot_card.write_card(card, directory=directory))
        files = export_mcore_to_hf(ckpt=root / name / "ckpt", out=root / name / "hf", ctx=ctx)
        assert files == ["config.json", "model.safetensors"], files  # a pkg:// tokenizer is not copied
        tokens, lengths = _tokens(250)
        ours = megatron_logits(chunks, tokens=tokens, vocab_size=250, ctx=ctx)
        result = compare(reference=hf_logits(root / name / "hf", tokens=tokens), ours=ours, tokens=tokens,
                         lengths=lengths)
        (root / name / "tp1.json").write_text(json.dumps(asdict(result)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    for seed, name in enumerate(NAMES):
        build_tiny_hf(root / name / "hf", family=name, seed=seed)
    run_distributed(_convert_export_compare, world_size=1, root=str(root))
    return root


@pytest.fixture(scope="module")
def deltas(converted) -> dict[str, dict[str, dict]]:
    for layout, (tensor, pipeline) in LAYOUTS.items():
        run_distributed(_compare_all, world_size=tensor * pipeline, tensor=tensor, pipeline=pipeline,
                        root=str(converted), layout=layout)
    return {name: {layout: json.loads((converted / name / f"{layout}.json").read_text())
                   for layout in ["tp1", *LAYOUTS]} for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_hf_at_tp1_tp2_and_pp2(deltas, name):
    print(name, {layout: f"{result['max_abs_logit_delta']:.1e} / {result['max_abs_logprob_delta']:.1e}"
                 for layout, result in deltas[name].items()})  # the figures of docs/conversion.md (pytest -s)
    for layout, result in deltas[name].items():
        assert result["tokens"] == sum(LENGTHS)
        assert result["max_abs_logit_delta"] < 1e-4, (layout, result)
        assert result["max_abs_logprob_delta"] < 1e-4, (layout, result)


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("name", NAMES)
def test_megatron_to_hf_round_trip_is_bit_exact(converted, name):
    original, back = _hf_tensors(converted / name / "hf"), _hf_tensors(converted / name / "back")
    assert original.keys() == back.keys()  # a tied model has no lm_head.weight on either side
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert json.loads((converted / name / "back" / "config.json").read_text()) == {
        **json.loads((converted / name / "hf" / "config.json").read_text()), "dtype": "float32"}


def test_a_sharded_export_loads_in_transformers_unmodified(converted):
    from transformers import AutoModelForCausalLM

    back = converted / SHARDED / "back"
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1 and (back / "model.safetensors.index.json").is_file()
    tokens, _ = _tokens(320)
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits
                  for path in (converted / SHARDED / "hf", back)]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name", NATIVE)
def test_a_pivot_made_here_exports_as_a_family_that_transformers_computes_alike(converted, name):
    result = json.loads((converted / name / "tp1.json").read_text())
    assert result["max_abs_logit_delta"] < 1e-4, result
    config = json.loads((converted / name / "hf" / "config.json").read_text())
    assert config["architectures"] == [NATIVE[name][0]] and config["vocab_size"] == 250  # 256 rows sliced


def test_the_checkpoint_carries_the_derived_model_config(converted):
    from infifpo_mcore.pivot_card import read_card

    card = read_card(converted / "qwen2" / "ckpt" / "iter_0000000")
    assert card.model.add_qkv_bias and card.model.tie_embeddings and card.model.norm_epsilon == 1e-6
    assert card.model.rotary_base == 1e6 and card.model.num_query_groups == 2
    assert card.hf_config["model_type"] == "qwen2" and card.tokenizer is None  # the tiny model has no tokenizer
    mistral = read_card(converted / "mistral" / "ckpt" / "iter_0000000").model
    assert mistral.max_position_embeddings == 256 and mistral.sliding_window == 32 and mistral.window_layers is None
    qwen3 = read_card(converted / "qwen3" / "ckpt" / "iter_0000000").model
    assert qwen3.kv_channels == 32 and qwen3.qk_layernorm and not qwen3.add_qkv_bias
    llama3 = read_card(converted / "llama3" / "ckpt" / "iter_0000000").model
    assert (llama3.rope_scaling, llama3.rope_scaling_factor, llama3.rope_original_max_position_embeddings) == (
        "llama3", 8.0, 64)
    gemma = read_card(converted / "gemma3" / "ckpt" / "iter_0000000").model
    assert gemma.window_layers == [True, False, True, False] and gemma.sliding_window == 16
    assert (gemma.rotary_base, gemma.local_rotary_base, gemma.rope_scaling) == (1e6, 1e4, "linear")
    assert gemma.scale_embeddings and gemma.zero_centered_norms and gemma.post_norms and gemma.qk_layernorm
    assert gemma.activation == "geglu_tanh" and gemma.softmax_scale == 24 ** -0.5 and gemma.kv_channels == 32
    assert read_card(converted / "llama_tied" / "ckpt" / "iter_0000000").model.make_vocab_size_divisible_by == 128


def test_a_tensor_size_that_pads_the_vocabulary_differently_is_refused_at_launch(converted):
    """llama_tied's 300 tokens were padded for --tp 2 to 512 rows; TP 1 would pad them to 384."""
    from infifpo_mcore.config import ConfigError, load_config
    from infifpo_mcore.pivot_card import resolve_pivot

    ckpt = converted / "llama_tied" / "ckpt"
    for tensor in (2, 4):  # 512 rows at both
        overrides = [f"checkpoint.load={ckpt}", f"parallel.tensor={tensor}"]
        assert resolve_pivot(load_config(overrides=overrides), overrides=overrides).model.vocab_size == 300
    overrides = [f"checkpoint.load={ckpt}", "parallel.tensor=1"]
    with pytest.raises(ConfigError, match=r"parallel.tensor=1: the pivot pads model.vocab_size 300 to 384 rows .* "
                                          r"stores 512; load it at a tensor size that pads alike"):
        resolve_pivot(load_config(overrides=overrides), overrides=overrides)


# --- training from each newly supported family's converted pivot ---------------------------------------------------

# family -> (tensor, pipeline) of the training run: Gemma 3 at TP 2 (its q/k norm gradients are reduced over TP),
# Qwen3 at PP 2 (the tied embedding on both stages), the others on one process
TRAINED = {"llama3": (1, 1), "qwen3": (1, 2), "mistral": (1, 1), "mistral_nemo": (1, 1), "gemma3": (2, 1)}


def _convert_for_training(ctx, *, root: str) -> None:
    from checkpoints_tools.conversion import convert_hf_to_mcore, plan_conversion

    for name in TRAINED:
        plan = plan_conversion(hf_dir=Path(root) / name / "hf", tensor=2, pipeline=2)
        convert_hf_to_mcore(plan=plan, out=Path(root) / name / "ckpt", ctx=ctx)


def _export_trained(ctx, *, root: str) -> None:
    from checkpoints_tools.conversion import export_mcore_to_hf

    for name in TRAINED:
        export_mcore_to_hf(ckpt=Path(root) / name / "run" / "ckpt", out=Path(root) / name / "back", ctx=ctx)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Each family's tiny model with the default Mistral tokenizer's 32000-token vocabulary, converted, trained 3
    DPO steps on 8 bundled pairs (60 to 130 tokens: past every tiny window and original RoPE context) with the
    real entry point, and exported."""
    from tests.launcher import REPO, run_training

    root = tmp_path_factory.mktemp("trained")
    for seed, name in enumerate(TRAINED):
        build_tiny_hf(root / name / "hf", family=name, seed=seed, vocab_size=32000)
    run_distributed(_convert_for_training, world_size=1, root=str(root))
    data = root / "prefs.jsonl"
    data.write_text("\n".join((REPO / "launch/data/tiny_prefs_train.jsonl").read_text().splitlines()[:8]) + "\n")
    for name, (tensor, pipeline) in TRAINED.items():
        run = root / name / "run"
        run_training(nproc=tensor * pipeline, overrides=[
            f"checkpoint.load={root / name / 'ckpt'}", f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}",
            f"data.path={data}", "data.eval_path=null", f"run_dir={run}", f"checkpoint.save={run / 'ckpt'}",
            "train.steps=3", "train.warmup_steps=0", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.lr=1e-3", "train.lr_schedule=constant", "model.seq_length=160"])
    run_distributed(_export_trained, world_size=1, root=str(root))
    return root


@pytest.mark.parametrize("name", TRAINED)
def test_a_converted_pivot_trains_and_exports(trained, name):
    import math

    from tests.launcher import read_metrics

    metrics = read_metrics(trained / name / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the pivot as converted is the reference
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # three steps on the same 8 pairs
    original, back = _hf_tensors(trained / name / "hf"), _hf_tensors(trained / name / "back")
    assert original.keys() == back.keys()
    assert not torch.equal(original["model.embed_tokens.weight"], back["model.embed_tokens.weight"])  # trained
    assert json.loads((trained / name / "back" / "config.json").read_text())["architectures"] == json.loads(
        (trained / name / "hf" / "config.json").read_text())["architectures"]
