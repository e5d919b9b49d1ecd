"""Item 4 and 5: bad input never passes silently and untrusted files are never unpickled.

Fuzzed rows are reported with file, line and field (the run refuses them unless data.skip_invalid_rows, which
skips, counts and lists them: see test_baseline.py); random rows and bytes raise nothing but DataError; configs
and checkpoints of the wrong shape or family are refused by name; crafted pickles inside a checkpoint are refused
before anything runs their code; no product code evaluates text or unpickles without an allow-list."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infifpo_mcore import checkpointing, pivot_card
from infifpo_mcore.checkpointing import CheckpointError, load_checkpoint, verify_checkpoint_files
from infifpo_mcore.config import ConfigError, load_config, validate_layout
from infifpo_mcore.data import KNOWN_FIELDS, DataError, load_preference_dataset
from infifpo_mcore.tokenization import build_tokenizer
from tests.launcher import REPO, run_training
from tests.reliability.conftest import STEPS, overrides

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(type="sentencepiece", path="pkg://mistral_common/data/tokenizer.model.v1",
                           chat_template="mistral")


def fused(sizes=(2, 2)):
    chosen, rejected = sizes
    return {"fuse_chosen_logps": [-4.0] * chosen, "fuse_rejected_logps": [-6.0] * rejected,
            "fuse_mean_chosen_logps": [-1.0] * chosen, "fuse_mean_rejected_logps": [-2.0] * rejected}


def good(**fields):
    return {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", **fused(), **fields}


# line -> (row, the problems it must produce: "field: problem" beginnings, <n> standing for a number)
FUZZED = {
    1: (good(), []),
    2: (good(chosen=""), ["chosen: expected a non-empty string or a non-empty list of messages"]),
    3: ({k: v for k, v in good().items() if k != "prompt"},
        ["prompt: missing (needed when chosen/rejected are strings)"]),
    4: (good(rejected=7), ["rejected: expected a non-empty string or a non-empty list of messages"]),
    5: (b'{"prompt": "caf\xe9", "chosen": "4", "rejected": "5"}', ["line: not valid UTF-8 (byte 15)"]),
    6: (good(chosen=[{"role": "assistant", "content": " "}]), ["chosen[0].content: missing or empty"]),
    7: (good(rejected="4"), ["rejected: identical to chosen"]),
    8: (good(prompt="seven " * 40), ["prompt: <n> tokens leave no room for the response in model.seq_length=32"]),
    9: (good(**fused((3, 3))), ["fuse_chosen_logps: 3 sources, but sources.models lists 2",
                                "fuse_chosen_logps: 3 sources, but line 1 has 2"]),
    10: (good(**{**fused(), "fuse_rejected_logps": [-6.0]}),
         ["fuse_rejected_logps: 1 entries, but fuse_chosen_logps has 2"]),
    11: (good(**{**fused(), "fuse_chosen_logps": [NAN, -1.0]}), ["fuse_chosen_logps[0]: not finite (nan)"]),
    12: (good(**{**fused(), "fuse_chosen_logps": [-1.0, INF]}), ["fuse_chosen_logps[1]: not finite (inf)"]),
    13: (good(**{**fused(), "fuse_mean_rejected_logps": [-2.0, 0.5]}),
         ["fuse_mean_rejected_logps[1]: log-probability must be <= 0, got 0.5"]),
    14: (good(id=1), ["id: duplicate of line 1 (1)"]),
    15: (b'{"prompt": "2 + 2?", "chosen": "\\udc00", "rejected": "5"}',
         ["chosen: not valid Unicode (a lone surrogate escape)"]),
    16: (b"[" * 100_000 + b"]" * 100_000, ["line: not usable JSON (RecursionError"]),
    17: (good(chosen="four " * 40 + "yes", rejected="four " * 40 + "no"),
         ["rejected: identical to chosen in the first <n> response tokens, all that fit model.seq_length=32"]),
}


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def fuzzed_file(tmp_path) -> Path:
    return write_lines(tmp_path / "fuzzed.jsonl", [row if isinstance(row, bytes) else json.dumps(row).encode()
                                                   for row, _ in FUZZED.values()])


def _load(path, tokenizer, **kwargs):
    return load_preference_dataset(path=path, tokenizer=tokenizer, seq_length=32, max_prompt_length=None,
                                   num_sources=2, **kwargs)


def test_every_fuzzed_problem_is_reported_with_file_line_and_field_and_the_run_refuses(tmp_path, tokenizer):
    path = fuzzed_file(tmp_path)
    with pytest.raises(DataError) as caught:
        _load(path, tokenizer)
    expected = [f"{path}:{line} {problem}" for line, (_, problems) in FUZZED.items() for problem in problems]
    got = caught.value.problems
    assert len(got) == len(expected)
    for text, beginning in zip(got, expected):
        assert re.match(re.escape(beginning).replace("<n>", r"\d+"), text), (text, beginning)


def test_the_skip_option_keeps_the_valid_rows_and_lists_every_problem(tmp_path, tokenizer):
    dataset = _load(fuzzed_file(tmp_path), tokenizer, skip_invalid=True)
    assert [row.line for row in dataset.rows] == [1]
    assert [example["row_id"] for example in dataset] == [0]
    assert dataset.num_skipped_rows == len(FUZZED) - 1
    assert len(dataset.skipped) == sum(len(problems) for _, problems in FUZZED.values())
    with pytest.raises(DataError, match="no valid row left to train on"):  # skipping never means "train on nothing"
        _load(write_lines(tmp_path / "bad.jsonl", [b"{}"]), tokenizer, skip_invalid=True)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner,
                                                                 max_size=3),
    max_leaves=8)
rows = st.dictionaries(st.sampled_from([*KNOWN_FIELDS, "ref_chosen_logp", "extra"]), json_values, max_size=8)
PROBLEM = re.compile(r".+:\d+ [\w\[\].]+: .+")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(rows.map(lambda row: json.dumps(row).encode()) | st.binary(max_size=40), min_size=1,
                      max_size=6))
def test_random_rows_and_bytes_give_a_dataset_or_a_data_error_naming_line_and_field(tmp_path, tokenizer, lines):
    path = write_lines(tmp_path / "random.jsonl", [line.replace(b"\n", b" ") for line in lines])
    try:
        _load(path, tokenizer)
    except DataError as error:
        assert error.problems
        for problem in error.problems:
            assert problem.startswith(f"{path}:") and (PROBLEM.fullmatch(problem) or "no rows" in problem), problem


config_values = st.none() | st.booleans() | st.integers(-5, 10 ** 6) | st.floats() | st.text(max_size=10)
config_keys = st.sampled_from(["train.steps", "parallel.tensor", "parallel.pipeline", "model.num_layers",
                               "loss.type", "loss.beta", "checkpoint.keep_last", "parallel.timeout_minutes",
                               "train.max_consecutive_bad_steps", "data.skip_invalid_rows", "trian.steps",
                               "model", "sources.models", "model.seq_length", "train.global_batch_size"])


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(config_keys, config_values), max_size=4), world_size=st.integers(-1, 16))
def test_random_config_overrides_give_a_config_or_a_config_error(pairs, world_size):
    try:
        cfg = load_config(overrides=[f"{key}={json.dumps(value)}" for key, value in pairs])
        validate_layout(cfg, world_size=world_size)
    except ConfigError as error:
        assert error.problems and all(isinstance(problem, str) for problem in error.problems)


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def checkpoint_copy(baseline, tmp_path) -> Path:
    copy = tmp_path / "iter"
    shutil.copytree(baseline["checkpoint"] / f"iter_{STEPS:07d}", copy)
    verify_checkpoint_files(copy)  # a genuine checkpoint passes
    return copy


def test_a_crafted_metadata_pickle_is_refused_before_it_runs(checkpoint_copy, tmp_path):
    marker = tmp_path / "pwned"
    (checkpoint_copy / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused: refers to posix\.system"):
        load_checkpoint(path=checkpoint_copy, model_chunks=None)  # refused before any model is touched
    assert not marker.exists()


def test_a_crafted_object_inside_the_shards_is_refused_before_it_runs(checkpoint_copy, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    marker = tmp_path / "pwned"
    metadata = pickle.loads((checkpoint_copy / ".metadata").read_bytes())  # our own file: trusted here
    key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(index for index in metadata.storage_data if index.fqn == key)
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    shard = checkpoint_copy / metadata.storage_data[index].relative_path
    offset = shard.stat().st_size
    with shard.open("ab") as file:
        file.write(buffer.getvalue())
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], offset=offset,
                                                       length=len(buffer.getvalue()))
    (checkpoint_copy / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=rf"item '{re.escape(key)}': refused: not loadable with "
                                              r"torch.load\(weights_only=True\)"):
        verify_checkpoint_files(checkpoint_copy)
    assert not marker.exists()


def test_a_crafted_common_state_is_refused_before_it_runs(checkpoint_copy, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker)}, checkpoint_copy / "common.pt")
    with pytest.raises(CheckpointError, match=r"common\.pt: refused: not loadable with torch.load\(weights_only"):
        verify_checkpoint_files(checkpoint_copy)
    assert not marker.exists()


def test_a_config_file_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'train:\n  steps: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(path=config)
    assert not marker.exists()


def test_a_checkpoint_of_another_model_shape_or_family_is_refused_by_name(data, baseline, tmp_path):
    other_shape = ["model.normalization=LayerNorm", "model.hidden_size=64", "model.ffn_hidden_size=176"]
    # The checkpoint's pivot card names its shape: a contradicting one is refused before any weight is read ...
    with pytest.raises(AssertionError) as caught:
        run_training(nproc=1, overrides=overrides(data, tmp_path / "card", f"checkpoint.load={baseline['checkpoint']}",
                                                  *other_shape))
    assert "model.hidden_size=64 (from the command line) contradicts checkpoint.load" in str(caught.value)
    # ... and without a card (a checkpoint from elsewhere) the stored tensor shapes are compared with the model's.
    without_card = tmp_path / "without_card"
    shutil.copytree(checkpointing.resolve_checkpoint(Path(baseline["checkpoint"])), without_card)
    (without_card / pivot_card.CARD_FILE).unlink()
    with pytest.raises(AssertionError) as caught:
        run_training(nproc=1, overrides=overrides(data, tmp_path, f"checkpoint.load={without_card}", *other_shape))
    message = str(caught.value)
    assert "checkpoint error: " in message and "does not fit this model" in message
    assert "decoder.final_layernorm.bias: missing from the checkpoint" in message
    assert ("embedding.word_embeddings.weight: shape (32000, 128) in the checkpoint, (32000, 64) in this model"
            in message)
    assert "Traceback" not in message.split("checkpoint error: ")[1].split("E1")[0]  # said plainly, once


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_product_code_evaluates_text_or_unpickles_without_an_allow_list():
    offenders = []
    for path in sorted([*(REPO / "infifpo_mcore").rglob("*.py"), *(REPO / "launch").rglob("*.py")]):
        for node, name in _calls(ast.parse(path.read_text(), filename=str(path))):
            keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
            unsafe = (name in ("eval", "exec", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load",
                               "marshal.loads")
                      or (name == "torch.load" and keywords.get("weights_only") != "True")
                      or (name.endswith("ForCausalLM.from_pretrained") and "use_safetensors" not in keywords))
            if unsafe:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)[:80]}")
    assert offenders == []
