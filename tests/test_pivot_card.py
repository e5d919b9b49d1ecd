"""The pivot card: written and read back with its tokenizer files, and the precedence rule of a run that loads it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from infifpo_mcore.config import ConfigError, ModelConfig, TokenizerConfig, load_config, validate_layout
from infifpo_mcore.pivot_card import apply_card, build_card, read_card, write_card

TINY_YAML = Path(__file__).resolve().parents[1] / "launch" / "configs" / "tiny_cpu.yaml"
SMOL = ModelConfig(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536,
                   vocab_size=49152, seq_length=8192, rotary_base=100000.0, max_position_embeddings=8192)


@pytest.fixture
def card(tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"model": "bpe"}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "model.safetensors").write_text("not a tokenizer file")
    built = build_card(model=SMOL, tokenizer=TokenizerConfig(type="hf", path=str(source / "tokenizer.json"),
                                                           chat_template=None), hf_config={"model_type": "llama"})
    (tmp_path / "iter").mkdir()
    write_card(built, directory=tmp_path / "iter")
    return read_card(tmp_path / "iter")


def test_the_card_comes_back_with_its_tokenizer_files(card, tmp_path):
    assert card.model == SMOL and card.hf_config == {"model_type": "llama"}
    assert card.tokenizer.path == str(tmp_path / "iter" / "tokenizer" / "tokenizer.json")
    assert card.tokenizer_files == {"chat_template.jinja": b"{{ messages }}", "tokenizer.json": b'{"model": "bpe"}'}
    assert read_card(tmp_path) is None  # a directory without a card


def test_the_card_replaces_the_config_files_model_and_tokenizer_but_not_the_run_choices(card):
    overrides = ["model.seq_length=256", "tokenizer.chat_template=chatml"]
    cfg = apply_card(load_config(path=TINY_YAML, overrides=overrides), card=card, source="CKPT", overrides=overrides)
    assert cfg.model == dataclasses.replace(SMOL, seq_length=256)  # tiny_cpu.yaml's 2 layers x 128 are gone
    assert cfg.tokenizer == dataclasses.replace(card.tokenizer, chat_template="chatml")
    assert apply_card(load_config(path=TINY_YAML), card=card, source="CKPT", overrides=[]).tokenizer == card.tokenizer


def test_a_command_line_model_key_that_contradicts_the_checkpoint_is_refused_by_name(card):
    overrides = ["model.num_layers=4", "model.hidden_size=576", "tokenizer.type=sentencepiece"]
    with pytest.raises(ConfigError) as caught:
        apply_card(load_config(path=TINY_YAML, overrides=overrides), card=card, source="CKPT", overrides=overrides)
    assert caught.value.problems == [
        "model.num_layers=4 (from the command line) contradicts checkpoint.load=CKPT, whose weights have "
        "model.num_layers=30; drop the override",
        "tokenizer.type='sentencepiece' (from the command line) contradicts checkpoint.load=CKPT, whose weights "
        "have tokenizer.type='hf'; drop the override",
    ]  # the equal model.hidden_size is accepted


def test_a_card_without_tokenizer_keeps_the_runs_tokenizer(card):
    bare = dataclasses.replace(card, tokenizer=None)
    cfg = apply_card(load_config(path=TINY_YAML), card=bare, source="CKPT", overrides=["tokenizer.type=hf"])
    assert cfg.tokenizer == load_config(path=TINY_YAML).tokenizer and cfg.model.num_layers == 30


def test_seq_length_beyond_the_models_position_limit_is_refused_at_launch(card):
    cfg = apply_card(load_config(overrides=["model.seq_length=9000"]), card=card, source="CKPT",
                     overrides=["model.seq_length=9000"])
    with pytest.raises(ConfigError, match=r"model.seq_length \(9000\) exceeds the model's position limit "
                                          r"model.max_position_embeddings \(8192\)"):
        validate_layout(cfg, world_size=1)
