import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import yaml

from infifpo_mcore.config import (
    ConfigError,
    InfiFPOConfig,
    LossType,
    ModelConfig,
    ParallelConfig,
    load_config,
    resolve_distributed_optimizer,
    resolve_precision,
    save_config,
    to_dict,
    validate_layout,
)

TINY_YAML = Path(__file__).resolve().parents[1] / "launch" / "configs" / "tiny_cpu.yaml"


ONE_SOURCE = "sources.models=[{name: a, path: /models/a}]"


def problems_of(*, overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path=path, overrides=overrides)
    return str(caught.value)


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        keys |= flat_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name}
    return keys


# --- loading and merging ---------------------------------------------------------------------------------------

def test_tiny_yaml_equals_defaults_except_layout_loss_data_and_checkpoint():
    """The tiny run differs from the defaults only where it must: 4-rank layout, InfiFPO settings for an untrained
    pivot (no clipping, the paper's beta), the bundled scored data with its own held-out split (a default eval file
    would silently keep evaluating the tiny set after a user changes data.path), and a checkpoint directory so its
    summary has one to show."""
    defaults = InfiFPOConfig()
    expected = dataclasses.replace(
        defaults,
        parallel=ParallelConfig(tensor=2, pipeline=2),
        loss=dataclasses.replace(defaults.loss, type="infifpo", beta=2.5, length_norm=True, clip=False),
        checkpoint=dataclasses.replace(defaults.checkpoint, save="runs/tiny/checkpoints"),
        data=dataclasses.replace(defaults.data, path="launch/data/tiny_fused_train.jsonl",
                                 eval_path="launch/data/tiny_fused_eval.jsonl"),
        train=dataclasses.replace(defaults.train, eval_interval=20),
    )
    assert load_config(path=TINY_YAML) == expected


def test_tiny_yaml_lists_every_key():
    assert flat_keys(yaml.safe_load(TINY_YAML.read_text())) == flat_keys(to_dict(InfiFPOConfig()))


def test_no_path_gives_defaults():
    assert load_config(path=None, overrides=[]) == InfiFPOConfig()


def test_overrides_apply_on_top_of_yaml_with_types_converted():
    cfg = load_config(path=TINY_YAML, overrides=[
        "loss.beta=0.2", "checkpoint.save=/x", "data.eval_path=null", "train.lr=1e-2", "loss.type=dpo",
        "model.vocab_size=512", "loss.clip=false", "train.steps=10", "train.steps=12",  # the later one wins
        "loss={fusion: max_margin, include_pivot_init: true}",
    ])
    assert isinstance(cfg, InfiFPOConfig) and isinstance(cfg.model, ModelConfig)
    assert cfg.loss.beta == 0.2 and isinstance(cfg.loss.beta, float)
    assert cfg.checkpoint.save == "/x"
    assert cfg.data.eval_path is None
    assert cfg.train.lr == 0.01
    assert cfg.loss.type == "dpo" and cfg.loss.type is LossType.dpo
    assert cfg.model.vocab_size == 512
    assert cfg.loss.clip is False
    assert cfg.train.steps == 12
    assert cfg.loss.fusion == "max_margin" and cfg.loss.include_pivot_init is True
    assert cfg.parallel.tensor == 2  # untouched YAML values survive
    assert cfg.model.hidden_size == 128


def test_float_field_accepts_an_int_and_interpolation_resolves():
    cfg = load_config(overrides=["loss.beta=1", "train.lr=${train.min_lr}"])
    assert cfg.loss.beta == 1.0 and isinstance(cfg.loss.beta, float)
    assert cfg.train.lr == cfg.train.min_lr


def test_dotted_keys_inside_yaml(tmp_path):
    config_file = tmp_path / "dotted.yaml"
    config_file.write_text("loss.beta: 0.3\ntrain:\n  steps: 7\n")
    cfg = load_config(path=config_file)
    assert (cfg.loss.beta, cfg.train.steps) == (0.3, 7)


# --- rejection: every message names the dotted key and what it accepts -------------------------------------------

@pytest.mark.parametrize("override, fragments", [
    ("loss.bta=0.2", ["loss.bta", "unknown key", "did you mean 'loss.beta'"]),
    ("train.beta=0.2", ["train.beta", "unknown key", "did you mean 'loss.beta'"]),
    ("modle.num_layers=2", ["modle", "unknown key", "did you mean 'model'"]),
    ("train.steps=abc", ["train.steps", "expected int", "'abc'"]),
    ("train.steps=null", ["train.steps", "expected int"]),
    ("train.steps=2.5", ["train.steps", "expected int", "2.5"]),
    ("model.vocab_size=many", ["model.vocab_size", "int or null"]),
    ("loss.beta=high", ["loss.beta", "expected float"]),
    ("loss.clip=2", ["loss.clip", "bool"]),
    ("model=3", ["model", "mapping"]),
    ("loss.type=orpo", ["loss.type", "infifpo, fpo, dpo, ipo, wrpo", "'orpo'"]),
    ("loss.wrpo_alpha=1.2", ["loss.wrpo_alpha", "[0, 1]", "1.2"]),
    ("loss.fusion=median", ["loss.fusion", "mean, sum, max_margin"]),
    ("train.precision=fp16", ["train.precision", "auto, fp32, bf16"]),
    ("train.lr_schedule=step", ["train.lr_schedule", "cosine, linear, constant"]),
    ("tokenizer.type=bpe", ["tokenizer.type", "hf, sentencepiece, tiktoken"]),
    ("model.normalization=rmsnorm", ["model.normalization", "RMSNorm, LayerNorm"]),
    ("model.activation=relu", ["model.activation", "swiglu, gelu"]),
    ("model.num_layers=0", ["model.num_layers", "> 0", "0"]),
    ("train.micro_batch_size=-1", ["train.micro_batch_size", "> 0", "-1"]),
    ("parallel.tensor=0", ["parallel.tensor", "> 0"]),
    ("model.vocab_size=0", ["model.vocab_size", "> 0"]),
    ("sources.num_ranks=-1", ["sources.num_ranks", ">= 0"]),
    ("sources.num_ranks=2", ["sources.num_ranks (2)", "no sources.models"]),
    ("sources.timeout_minutes=0", ["sources.timeout_minutes", "> 0"]),
    ("sources.models=[{name: a, path: /m, gguf_file: a.gguf, tensor_parallel: true}]",
     ["sources.models[0].tensor_parallel", "GGUF source is not sharded", "export_gguf_as_hf"]),
    ("sources.models=[{name: a, path: /m, precision: fp8, tensor_parallel: true}]",
     ["sources.models[0].tensor_parallel", "FP8 sources", "bf16"]),
    ("loss.beta=0", ["loss.beta", "> 0"]),
    ("loss.beta=-0.1", ["loss.beta", "> 0"]),
    ("train.min_lr=-1e-5", ["train.min_lr", ">= 0"]),
    ("train.min_lr=1e-2", ["train.lr (0.001) must be >= train.min_lr (0.01)"]),
    ("train.adam_beta2=1.0", ["train.adam_beta2", "[0, 1)"]),
    ("model.hidden_size=130", ["model.hidden_size (130)", "divisible by model.num_attention_heads (4)"]),
    ("model.num_query_groups=3", ["model.num_attention_heads (4)", "divisible by model.num_query_groups (3)"]),
    ("train.global_batch_size=7", ["train.global_batch_size (7)", "divisible by train.micro_batch_size (2)"]),
    ("train.warmup_steps=60", ["train.warmup_steps (60)", "< train.steps (60)"]),
    ("data.max_prompt_length=128", ["data.max_prompt_length (128)", "model.seq_length (128)"]),
    ("checkpoint.save_interval=5", ["checkpoint.save_interval", "checkpoint.save"]),
    ("checkpoint.keep_last=0", ["checkpoint.keep_last", "> 0"]),
    ("train.max_consecutive_bad_steps=0", ["train.max_consecutive_bad_steps", "> 0"]),
    ("parallel.timeout_minutes=0", ["parallel.timeout_minutes", "> 0"]),
    ("data.skip_invalid_rows=2", ["data.skip_invalid_rows", "bool"]),
    ("data.path=", ["data.path", "expected str", "None"]),
    ("data.path=''", ["data.path", "must not be empty"]),
    ("model.kv_channels=0", ["model.kv_channels", "> 0"]),
    ("model.rope_scaling=yarn", ["model.rope_scaling", "one of: none, linear, llama3"]),
    ("model.rope_scaling=llama3", ["model.rope_original_max_position_embeddings: rope_scaling llama3 needs it"]),
    ("model.window_layers=[true,false]", ["model.window_layers: set, but model.sliding_window", "null"]),
    ("model.local_rotary_base=10000", ["model.local_rotary_base: set, but there are no sliding-window layers"]),
    ("oops", ["malformed override 'oops'", "key.sub=value"]),
    ("=3", ["malformed override '=3'"]),
])
def test_rejects_with_key_and_allowed_values(override, fragments):
    message = problems_of(overrides=[override])
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_a_model_with_its_own_head_size_needs_no_divisible_hidden_size():
    cfg = load_config(overrides=["model.hidden_size=130", "model.kv_channels=32"])  # Gemma-3-1B: 1152 / 4 = 288
    assert cfg.model.kv_channels == 32


def test_window_layers_must_name_every_layer_and_gemma_layers_have_no_fp8():
    message = problems_of(overrides=["model.sliding_window=16", "model.window_layers=[true,false,true]"])
    assert "model.window_layers: 3 entries for model.num_layers 2 (one per layer)" in message
    message = problems_of(overrides=["model.zero_centered_norms=true", "train.precision=fp8"])
    assert "model.zero_centered_norms: this layer is built from Megatron-Core's local modules" in message
    message = problems_of(overrides=["model.post_norms=true", "model.normalization=LayerNorm"])
    assert "model.post_norms: needs model.normalization RMSNorm, got LayerNorm" in message


def test_online_sources_with_a_loss_that_uses_no_source_scores_are_refused():
    message = problems_of(overrides=["sources.num_ranks=1", ONE_SOURCE, "loss.type=dpo"])
    assert "sources.num_ranks (1): loss.type=dpo uses no source scores" in message
    assert load_config(overrides=["sources.num_ranks=1", ONE_SOURCE, "loss.type=fpo"]).sources.num_ranks == 1


def test_all_problems_are_collected_in_one_error():
    with pytest.raises(ConfigError) as caught:
        load_config(path=TINY_YAML, overrides=["loss.bta=1", "loss.type=x", "train.steps=abc", "oops",
                                               "model.hidden_size=130", "train.warmup_steps=99"])
    problems = caught.value.problems
    assert len(problems) == 6, problems
    assert [p.split(":")[0].split(" ")[0] for p in problems] == [
        "malformed", "loss.bta", "loss.type", "train.steps", "model.hidden_size", "train.warmup_steps"]


def test_yaml_problems_name_the_file(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("train:\n  stepz: 3\nloss:\n  type: nope\n")
    message = problems_of(path=config_file, overrides=[])
    assert "train.stepz: unknown key" in message and "did you mean 'train.steps'" in message
    assert "loss.type" in message and "infifpo, fpo, dpo, ipo" in message
    assert str(config_file) in message


@pytest.mark.parametrize("text, fragment", [("a: [1, 2\n", "cannot read config file"),
                                            ("- 1\n- 2\n", "mapping at the top level")])
def test_unreadable_yaml(tmp_path, text, fragment):
    config_file = tmp_path / "broken.yaml"
    config_file.write_text(text)
    assert fragment in problems_of(path=config_file, overrides=[])


def test_missing_file():
    assert "cannot read config file /no/such/file.yaml" in problems_of(path=Path("/no/such/file.yaml"), overrides=[])


def test_config_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ConfigError(["a: bad", "b: worse"])))
    assert error.problems == ["a: bad", "b: worse"] and "2 problem(s)" in str(error)


# --- layout ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size, overrides, data_parallel", [
    (1, [], 1),
    (4, ["parallel.tensor=2", "parallel.pipeline=2"], 1),
    (8, ["parallel.tensor=2", "parallel.pipeline=2"], 2),
    (4, [], 4),
    (6, ["parallel.tensor=2", "sources.num_ranks=2", ONE_SOURCE], 2),
    (4, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=4"], 2),
])
def test_validate_layout_returns_data_parallel_size(world_size, overrides, data_parallel):
    assert validate_layout(load_config(overrides=overrides), world_size=world_size) == data_parallel


@pytest.mark.parametrize("world_size, overrides, fragments", [
    (3, ["parallel.tensor=2", "parallel.pipeline=2"],
     ["parallel.tensor (2) x parallel.pipeline (2) = 4", "3 training"]),
    (5, ["parallel.tensor=2", "parallel.pipeline=2", "sources.num_ranks=2", ONE_SOURCE],
     ["sources.num_ranks 2", "3 training"]),
    (2, ["sources.num_ranks=2", ONE_SOURCE], ["sources.num_ranks (2) leaves no training ranks"]),
    (3, [], ["train.global_batch_size (8)", "train.micro_batch_size (2) x data-parallel size (3) = 6"]),
    (3, ["parallel.pipeline=3"], ["model.num_layers (2)", "parallel.pipeline (3)"]),
    (4, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"], ["model.num_layers (2)", "virtual_pipeline (2)"]),
    (1, ["parallel.virtual_pipeline=2"], ["parallel.virtual_pipeline (2) needs parallel.pipeline > 1"]),
    (4, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=4", "train.global_batch_size=6",
         "train.micro_batch_size=1"], ["parallel.virtual_pipeline (2): the 3 micro-batches per step",
                                       "must be a multiple of parallel.pipeline (2)"]),
    (4, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=4", "train.global_batch_size=6",
         "train.micro_batch_size=null"], ["parallel.virtual_pipeline (2): the 3 pairs per data-parallel rank",
                                          "must be a multiple of parallel.pipeline (2)"]),
    (8, ["parallel.tensor=8", "model.hidden_size=128"], ["model.num_attention_heads (4)", "parallel.tensor (8)"]),
    (4, ["parallel.tensor=4"], ["model.num_query_groups (2)", "parallel.tensor (4)"]),
    (3, ["parallel.tensor=3", "model.num_attention_heads=6", "model.num_query_groups=3", "model.hidden_size=132",
         "model.ffn_hidden_size=350"], ["model.ffn_hidden_size (350)", "parallel.tensor (3)"]),
    (0, [], ["world size must be >= 1"]),
    (1, ["parallel.overlap_param_gather=true"], ["parallel.overlap_param_gather: needs the distributed optimizer",
                                                "parallel.distributed_optimizer=auto", "data-parallel size 1"]),
    (2, ["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"],
     ["parallel.distributed_optimizer=false"]),
])
def test_validate_layout_rejects(world_size, overrides, fragments):
    cfg = load_config(overrides=overrides)
    with pytest.raises(ConfigError) as caught:
        validate_layout(cfg, world_size=world_size)
    for fragment in fragments:
        assert fragment in str(caught.value), f"{fragment!r} not in:\n{caught.value}"


# --- precision, to_dict, save/load -------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, cuda, bf16_supported, expected", [
    ("auto", False, False, "fp32"), ("auto", True, True, "bf16"), ("auto", True, False, "fp32"),
    ("fp32", True, True, "fp32"), ("bf16", False, False, "bf16"),
])
def test_resolve_precision(monkeypatch, precision, cuda, bf16_supported, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    device = torch.device("cuda" if cuda else "cpu")  # the pivot's and every source's: one resolver
    resolved = resolve_precision(load_config(overrides=[f"train.precision={precision}"]).train.precision,
                                 device=device, what="train.precision")
    assert resolved == expected and type(resolved) is str


@pytest.mark.parametrize("setting, world_size, expected", [
    ("auto", 1, False), ("auto", 2, True), ("true", 1, True), ("false", 4, False), ("True", 1, True),
])
def test_the_distributed_optimizer_is_on_when_asked_or_with_data_parallel_ranks(setting, world_size, expected):
    """auto: on where there is optimizer state to shard (data parallel > 1); YAML's true/false are the switch's."""
    cfg = load_config(overrides=[f"parallel.distributed_optimizer={setting}"])
    assert resolve_distributed_optimizer(cfg, data_parallel=validate_layout(cfg, world_size=world_size)) is expected
    with_gather = load_config(overrides=["parallel.distributed_optimizer=auto", "parallel.overlap_param_gather=true"])
    assert validate_layout(with_gather, world_size=2) == 2


def test_the_distributed_optimizer_switch_names_its_values():
    message = problems_of(overrides=["parallel.distributed_optimizer=sometimes"])
    assert "parallel.distributed_optimizer: expected one of: auto, true, false, got 'sometimes'" in message


def test_fp8_without_an_fp8_gpu_and_transformer_engine_is_refused_with_the_way_out():
    import torch

    with pytest.raises(ConfigError, match=r"source 'big' precision: fp8 needs .*no CUDA device.*Use bf16 or auto"):
        resolve_precision("fp8", device=torch.device("cpu"), what="source 'big' precision")


def test_to_dict_holds_plain_values():
    as_dict = to_dict(load_config(overrides=["loss.type=ipo"]))
    assert type(as_dict["loss"]["type"]) is str and as_dict["loss"]["type"] == "ipo"
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["parallel"] == {"tensor": 1, "pipeline": 1, "virtual_pipeline": None, "timeout_minutes": 10.0,
                                   "overlap_grad_reduce": True, "ddp_bucket_size": None,
                                   "distributed_optimizer": "auto", "overlap_param_gather": False}


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(path=TINY_YAML, overrides=[
        "loss.type=ipo", "loss.beta=0.05", "loss.fusion=sum", "data.eval_path=eval.jsonl", "model.vocab_size=1000",
        "checkpoint.save=/tmp/ckpt", "checkpoint.save_interval=10", "train.lr=3e-5", "train.min_lr=0",
        "tokenizer.chat_template=null", "model.normalization=LayerNorm", "run_dir=runs/x y",
    ])
    saved = tmp_path / "saved.yaml"
    save_config(cfg, path=saved)
    assert load_config(path=saved) == cfg
    assert yaml.safe_load(saved.read_text()) == to_dict(cfg)


def test_a_null_micro_batch_size_needs_only_the_data_parallel_split():
    cfg = load_config(overrides=["train.micro_batch_size=null", "train.global_batch_size=6"])
    assert cfg.train.micro_batch_size is None
    assert validate_layout(cfg, world_size=2) == 2
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(6\) must be divisible by the data-parallel "
                                          r"size \(4\)"):
        validate_layout(cfg, world_size=4)


def test_an_fp8_pivot_needs_gemm_dimensions_that_are_multiples_of_16():
    message = problems_of(overrides=["train.precision=fp8", "model.seq_length=200"])
    assert "model.seq_length (200): train.precision fp8 needs a multiple of 16 (FP8 GEMM shapes)" in message
    assert load_config(overrides=["train.precision=fp8", "model.seq_length=208"]).train.precision == "fp8"


def test_a_held_out_split_that_is_the_training_split_of_the_same_folder_is_refused():
    same = ["data.path=/data/folder", "data.split=train", "data.eval_path=/data/folder"]
    assert "the held-out rows would be the training rows" in problems_of(overrides=same)
    assert load_config(overrides=[*same, "data.eval_split=test"]).data.eval_split == "test"
    assert load_config(overrides=[*same[:2], "data.eval_path=/data/other"]).data.eval_path == "/data/other"
