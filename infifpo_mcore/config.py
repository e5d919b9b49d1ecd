"""Typed run configuration: a dataclass tree, loaded from YAML plus dotted CLI overrides, validated at start.

    cfg = load_config(path="launch/configs/tiny_cpu.yaml", overrides=["loss.beta=0.2", "data.eval_path=null"])
    data_parallel_size = validate_layout(cfg, world_size=4)

OmegaConf parses the YAML and the override values (`null`, `1e-3`, `{a: 1}` all mean what YAML says) and converts
each value to its field's type. Every key is applied on its own so that one `ConfigError` can list all problems
at once, each naming the full dotted key and what it accepts. Callers get plain dataclass instances back.
Fields with a fixed set of values are `StrEnum`s: they compare and hash equal to their string values.
"""

import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from operator import attrgetter
from types import NoneType, UnionType
from typing import Any, get_args, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from infifpo_mcore.refusals import Refusal


class ConfigError(Refusal, ValueError):
    """Invalid configuration; `problems` holds one line per problem, naming the dotted key where there is one."""

    label = "config error"

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems)  # the list as the only arg keeps the error picklable across processes

    def __str__(self) -> str:
        return f"invalid config ({len(self.problems)} problem(s)):\n" + "\n".join(
            f"  - {problem}" for problem in self.problems)


# Member names equal their values because OmegaConf reads enum fields by member name.
class Normalization(StrEnum):
    RMSNorm = "RMSNorm"
    LayerNorm = "LayerNorm"


class Activation(StrEnum):
    swiglu = "swiglu"  # gated: silu(gate) * up
    gelu = "gelu"  # not gated
    geglu_tanh = "geglu_tanh"  # gated: gelu(gate, tanh approximation) * up (Gemma's gelu_pytorch_tanh)


class RopeScaling(StrEnum):
    """How RoPE's frequencies are stretched for contexts longer than the base was trained on (HF rope_scaling)."""
    none = "none"
    linear = "linear"  # every frequency / factor
    llama3 = "llama3"  # Llama 3.1: low frequencies / factor, high ones kept, a smooth blend between


class TokenizerType(StrEnum):
    hf = "hf"
    sentencepiece = "sentencepiece"
    tiktoken = "tiktoken"


class LossType(StrEnum):
    infifpo = "infifpo"
    fpo = "fpo"
    dpo = "dpo"
    ipo = "ipo"
    wrpo = "wrpo"
    infifpo_ipo = "infifpo_ipo"  # InfiFPO's fused reference with IPO's loss
    infifpo_wrpo = "infifpo_wrpo"  # ... with WRPO's two chosen responses and alpha ramp
    sft = "sft"  # supervised fine-tuning: the NLL of the chosen response


class Fusion(StrEnum):
    mean = "mean"
    sum = "sum"
    max_margin = "max_margin"
    confidence = "confidence"


class LRSchedule(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Recompute(StrEnum):
    """Activation recomputation (Megatron's recompute_granularity): memory for compute."""
    none = "none"
    selective = "selective"  # the attention core (its s x s scores when attention is not fused)
    full = "full"  # every transformer layer: only its input is kept, the rest recomputed in the backward pass


class Precision(StrEnum):
    """The pivot's (train.precision) and each source's; ``resolve_precision`` says what auto means on a device."""
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    # bf16 weights, FP8 matmuls through Transformer Engine (the pivot: Megatron's fp8="hybrid", delayed scaling)
    fp8 = "fp8"


class Switch(StrEnum):
    """On, off, or chosen from the layout (YAML's true/false are read as these)."""
    auto = "auto"
    true = "true"
    false = "false"


@dataclass
class ModelConfig:
    """Shape of the pivot: a Llama-style decoder, with the variations of the families checkpoints_tools converts
    (head size, q/k norms, RoPE scaling, sliding windows, Gemma 3's layer)."""
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 352
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    seq_length: int = 128
    normalization: Normalization = Normalization.RMSNorm
    activation: Activation = Activation.swiglu
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    add_qkv_bias: bool = False  # a bias on the query/key/value projection only (Qwen2)
    norm_epsilon: float = 1e-5
    # The longest sequence the weights were trained for (a converted model's max_position_embeddings); None: no
    # limit known. model.seq_length must not exceed it.
    max_position_embeddings: int | None = None
    # The size of each attention head; None: hidden_size / num_attention_heads (Mistral-Nemo, Qwen3, Gemma 3 differ)
    kv_channels: int | None = None
    qk_layernorm: bool = False  # an RMSNorm on every query and key head before RoPE (Qwen3, Gemma 3)
    softmax_scale: float | None = None  # of the attention scores; None: 1 / sqrt(kv_channels)
    rope_scaling: RopeScaling = RopeScaling.none
    rope_scaling_factor: float = 1.0  # linear, llama3
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are divided by the factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept
    rope_original_max_position_embeddings: int | None = None  # llama3: the context the rotary base was trained for
    # Sliding-window attention: a query sees the last sliding_window tokens (itself included), in every layer or in
    # those window_layers marks true (one entry per layer; the others attend to the whole sequence).
    sliding_window: int | None = None
    window_layers: list[bool] | None = None
    local_rotary_base: float | None = None  # RoPE base of the sliding-window layers (Gemma 3); None: rotary_base
    # Gemma's layer
    scale_embeddings: bool = False  # the embedding output multiplied by sqrt(hidden_size)
    zero_centered_norms: bool = False  # every RMSNorm scales by (1 + weight) (Megatron's layernorm_zero_centered_gamma)
    post_norms: bool = False  # an RMSNorm on the attention and MLP outputs, before each residual add


def head_dim(model: ModelConfig) -> int:
    """The size of one attention head: ``kv_channels``, or hidden_size / num_attention_heads."""
    return model.kv_channels or model.hidden_size // model.num_attention_heads



def needs_own_layer(model: ModelConfig) -> bool:
    """Whether the pivot needs the layer of ``layer_spec.own_block_spec`` (Gemma's: (1 + w) norms, post-norms, a RoPE
    base per layer kind), built from Megatron-Core's local modules on every device, rather than Megatron's GPT spec."""
    return model.zero_centered_norms or model.post_norms or model.local_rotary_base is not None


@dataclass
class TokenizerConfig:
    type: TokenizerType = TokenizerType.sentencepiece
    path: str = "pkg://mistral_common/data/tokenizer.model.v1"
    # A template name known to tokenization.py, an explicit jinja string, or None for the tokenizer's own.
    chat_template: str | None = "mistral"


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    # A collective that waits longer ends the job with an error instead of hanging (torch.distributed and
    # Megatron's groups). Fractions of a minute are allowed.
    timeout_minutes: float = 10.0
    # Data-parallel gradient all-reduce bucket by bucket during the last micro-batch's backward pass, instead of
    # after it (Megatron DDP); the bucket size in parameters (null: Megatron's default, max(40M, 1M x DP size))
    overlap_grad_reduce: bool = True
    ddp_bucket_size: int | None = None
    # Megatron's distributed optimizer: fp32 main weights and Adam moments sharded over the data-parallel ranks
    # (gradients reduce-scattered, weights all-gathered after the step); auto: on when data parallel > 1
    distributed_optimizer: Switch = Switch.auto
    # With it: the weight all-gather after the step overlaps the next forward, bucket by bucket
    overlap_param_gather: bool = False


@dataclass
class SourceTokenizerConfig:
    """A source model's own tokenizer; the defaults take the model directory's tokenizer and chat template."""
    type: TokenizerType = TokenizerType.hf
    path: str | None = None  # None: <model dir>/tokenizer.json, or for a GGUF source the tokenizer inside the file
    chat_template: str | None = None  # None: the tokenizer's own; base models without one: "plain"


@dataclass
class SourceConfig:
    """One source model, scored offline by launch/score_sources.py or online by the source ranks (sources.num_ranks)
    (see infifpo_mcore/sources.py and source_group.py)."""
    name: str = ""  # keys the source's entries in the score cache; unique
    path: str = ""  # a HF model directory, or pkg://package/relative/dir inside an installed package
    gguf_file: str | None = None  # a GGUF file in `path` to load (dequantised by transformers) instead of HF weights
    tokenizer: SourceTokenizerConfig = field(default_factory=SourceTokenizerConfig)
    precision: Precision = Precision.auto  # auto: bf16 on a CUDA device that supports it, else fp32
    # Shard the model's layers over every rank that scores (the source group online, the torchrun ranks offline)
    # by transformers' tensor-parallel plan: for a source too big for one device
    tensor_parallel: bool = False


@dataclass
class SourcesConfig:
    num_ranks: int = 0  # ranks scoring the source models online; 0 = scores come cached in the data
    models: list[SourceConfig] = field(default_factory=list)  # in fuse_* list order
    output: str | None = None  # the scored dataset launch/score_sources.py writes (or its --out)
    chunk_rows: int = 64  # rows scored between two appends to the score cache: what an interruption can lose
    batch_tokens: int = 4096  # padded tokens per source forward pass
    # Score a row's chosen and rejected in one sequence, the prompt computed once, where that is exact (attention that
    # takes a custom mask, sequences within any sliding window, an unsharded source); false: two sequences per row
    share_prompt: bool = True
    # FP8 sources: rows scored also in bf16 at start, to report the mean / max |delta log-prob| per token (0: off)
    precision_check_rows: int = 16
    # Online: how long the last stage waits for a batch's scores (the first includes loading the source models)
    timeout_minutes: int = 30


@dataclass
class LossConfig:
    type: LossType = LossType.infifpo
    beta: float = 0.1
    ipo_tau: float | None = None  # IPO's tau (its margin target is 1 / (2 tau)); null: beta
    length_norm: bool = True
    clip: bool = True
    fusion: Fusion = Fusion.mean
    include_pivot_init: bool = False
    # WRPO's target fusion coefficient: alpha = wrpo_alpha x (steps done) / train.steps, 0 at the first step
    # (losses.wrpo_alpha, as SLIT-AI/WRPO ramps it)
    wrpo_alpha: float = 0.5
    label_smoothing: float = 0.0  # the sigmoid losses: conservative DPO's eps, in [0, 0.5)
    sft_weight: float = 0.0  # a preference loss + this x the chosen response's NLL per token (RPO)


@dataclass
class DataConfig:
    # A JSONL or JSON file, parquet or arrow file(s) (a glob pattern reads several), or a folder written by
    # datasets.save_to_disk (data.md)
    path: str = "launch/data/tiny_prefs_train.jsonl"
    eval_path: str | None = None
    split: str | None = None  # the split of a save_to_disk folder that holds several (DatasetDict)
    eval_split: str | None = None  # the same for data.eval_path (null: data.split)
    max_prompt_length: int | None = None  # None: prompts are only limited by model.seq_length
    shuffle: bool = True
    skip_invalid_rows: bool = False  # false: any invalid row stops the run at start; true: skipped, counted, listed
    # Padding-free micro-batches (packing.py): whole pairs packed into one row of pack_tokens tokens, attention and
    # positions per sequence. null: on where the layer spec's attention runs it (the local spec: CPU, GPUs without
    # Transformer Engine, Gemma 3), off on Transformer Engine's (its THD path is not verified yet; true uses it)
    packing: bool | None = None
    # Tokens per packed micro-batch; null: train.micro_batch_size x responses per pair x model.seq_length (the
    # unpacked micro-batch's size). At least responses per pair x model.seq_length, so every pair fits.
    pack_tokens: int | None = None
    # Packed pairs hold their prompt once, each response seeing it and itself but not the other response(s);
    # null: wherever packing is on, but on Transformer Engine (refused there)
    share_prompt: bool | None = None


@dataclass
class TrainConfig:
    # Pairs per micro-batch; null: the largest that the memory estimate fits on the device (memory.py)
    micro_batch_size: int | None = 2
    global_batch_size: int = 8
    steps: int = 60
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 3
    lr_schedule: LRSchedule = LRSchedule.cosine
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    seed: int = 1234
    precision: Precision = Precision.auto  # auto: bf16 on a CUDA device that supports it, else fp32
    eval_interval: int | None = None  # steps between evaluations of data.eval_path (None: only after the last step)
    eval_on_start: bool = False  # also evaluate before the first step (the pivot as loaded; logged as step 0)
    recompute: Recompute = Recompute.none  # activation recomputation; see memory.py for what each keeps
    # Steps with NaN/inf in the loss or gradients are skipped (no update); this many in a row stop the run.
    max_consecutive_bad_steps: int = 5


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None  # None: save only at the end of training
    keep_last: int | None = None  # keep the newest K checkpoints in `save`, delete older ones; None: keep all


@dataclass
class LoggingConfig:
    """Where metrics go besides <run_dir>/metrics.jsonl (always written) and TensorBoard (<run_dir>/tensorboard)."""
    wandb_project: str | None = None  # set: also log to Weights & Biases (needs `pip install wandb`)
    wandb_run_name: str | None = None  # None: the run_dir's name
    # Every evaluation also writes <run_dir>/eval_rows/step_NNNNNN.jsonl: each held-out row's id, loss, metrics and
    # policy log-probs (sums and token counts), e.g. to compute multiple-choice accuracy over a question's pairs.
    eval_rows: bool = False


@dataclass
class InfiFPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/tiny"


def _schema_type(key: str, root: type | None = None) -> Any:
    """The annotated type of dotted `key` in the config tree (or under `root`), or None when no such key exists."""
    node: Any = root or InfiFPOConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in (hints := get_type_hints(node)):
            return None
        node = hints[part]
    return node


def _all_keys(node: type | None = None, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in get_type_hints(node or InfiFPOConfig).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            keys.extend(_all_keys(hint, f"{prefix}{name}."))
    return keys


def _unknown_key_problem(key: str, origin: str, root: type | None = None, label: str = "") -> str:
    valid_keys = _all_keys(root)
    leaf = key.rsplit(".", 1)[-1]
    # A known field name in the wrong section ("train.beta") is a better hint than the closest spelling.
    same_leaf = [valid for valid in valid_keys if valid.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(key, valid_keys, n=1)
    hint = f"; did you mean '{label}{close[0]}'?" if close else ""
    return f"{label}{key}: unknown key (in {origin}){hint}"


def _describe_type(hint: Any) -> str:
    """What a field accepts, in words: 'int', 'int or null', 'one of: mean, sum, max_margin', ..."""
    if isinstance(hint, UnionType):
        return " or ".join("null" if arg is NoneType else _describe_type(arg) for arg in get_args(hint))
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of: " + ", ".join(member.value for member in hint)
    if dataclasses.is_dataclass(hint):
        return "a mapping of its sub-keys"
    return "bool (true/false)" if hint is bool else hint.__name__


def _flatten(tree: dict, prefix: str = "", root: type | None = None) -> list[tuple[str, Any]]:
    """Split a nested mapping into (dotted key, value) leaves, descending only into config sections."""
    leaves = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and dataclasses.is_dataclass(_schema_type(key, root)):
            leaves.extend(_flatten(value, f"{key}.", root))
        else:
            leaves.append((key, value))
    return leaves


def _section_list_item(hint: Any) -> type | None:
    """The section type of a `list[Section]` field (`sources.models`), else None."""
    args = get_args(hint)
    return args[0] if getattr(hint, "__origin__", None) is list and dataclasses.is_dataclass(args[0]) else None


def _apply(merged: DictConfig, *, key: str, value: Any, origin: str, root: type | None = None,
           label: str = "") -> list[str]:
    """Set one dotted key; returns problem lines instead of raising so that all problems get reported.

    `root` and `label` apply this to one item of a section list: keys are looked up in the item's type and
    named `label + key` (e.g. `sources.models[0].precision`) in messages.
    """
    hint = _schema_type(key, root)
    if hint is None:
        return [_unknown_key_problem(key, origin, root, label)]
    if (item_type := _section_list_item(hint)) is not None:
        return _apply_section_list(merged, key=key, item_type=item_type, value=value, origin=origin)
    wrong_type = f"{label}{key}: expected {_describe_type(hint)}, got {value!r} (in {origin})"
    if hint is Switch and isinstance(value, bool):  # YAML reads `true` as a bool
        value = str(value).lower()
    # OmegaConf would turn any int into a bool (2 -> True); a bool field takes only true/false.
    if hint is bool and not isinstance(value, bool):
        return [wrong_type]
    try:
        OmegaConf.update(merged, key, value, merge=True)
    except OmegaConfBaseException:
        return [wrong_type]
    return []


def _apply_section_list(merged: DictConfig, *, key: str, item_type: type, value: Any, origin: str) -> list[str]:
    """Replace a list of sections; every key of every item is checked as a top-level key would be."""
    if not isinstance(value, list):
        return [f"{key}: expected a list of mappings with keys {', '.join(_all_keys(item_type))}, got {value!r} "
                f"(in {origin})"]
    problems, items = [], []
    for index, entry in enumerate(value):
        item = OmegaConf.structured(item_type)
        if not isinstance(entry, dict):
            problems.append(f"{key}[{index}]: expected a mapping, got {entry!r} (in {origin})")
            continue
        for sub_key, sub_value in _flatten(entry, root=item_type):
            problems += _apply(item, key=sub_key, value=sub_value, origin=origin, root=item_type,
                               label=f"{key}[{index}].")
        items.append(item)
    if not problems:
        OmegaConf.update(merged, key, items, merge=False)
    return problems


def _read_yaml(path: str | os.PathLike, problems: list[str]) -> dict:
    """The file as a nested dict; {} after appending to `problems` when it cannot be used."""
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as error:
        problems.append(f"cannot read config file {os.fspath(path)}: {error}")
        return {}
    if not isinstance(loaded, dict):
        problems.append(f"config file {os.fspath(path)} must hold a mapping at the top level")
        return {}
    return loaded


def _parse_override(override: str, problems: list[str]) -> dict:
    """`a.b=value` as {'a': {'b': value}}, the value read as YAML; {} after appending to `problems` if malformed."""
    key, sep, _ = override.partition("=")
    if not sep or not key.strip():
        problems.append(f"malformed override {override!r}: expected key.sub=value, e.g. loss.beta=0.2")
        return {}
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([override]), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        problems.append(f"malformed override {override!r}: {error}")
        return {}


def _value_problems(cfg: InfiFPOConfig) -> list[str]:
    """Checks that need only the config (world-size checks live in `validate_layout`)."""
    problems = []

    def get(key: str) -> Any:
        return attrgetter(key)(cfg)

    positive = ["model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.num_query_groups",
                "model.ffn_hidden_size", "model.vocab_size", "model.seq_length", "model.make_vocab_size_divisible_by",
                "model.rotary_base", "model.init_method_std", "model.norm_epsilon", "model.max_position_embeddings",
                "model.kv_channels", "model.softmax_scale", "model.rope_scaling_factor", "model.rope_low_freq_factor",
                "model.rope_high_freq_factor", "model.rope_original_max_position_embeddings", "model.sliding_window",
                "model.local_rotary_base",
                "parallel.tensor", "parallel.pipeline", "parallel.virtual_pipeline", "train.eval_interval",
                "sources.chunk_rows", "sources.batch_tokens", "sources.timeout_minutes", "loss.beta", "loss.ipo_tau",
                "data.max_prompt_length", "data.pack_tokens", "train.micro_batch_size",
                "train.global_batch_size", "train.steps", "train.lr", "checkpoint.save_interval",
                "checkpoint.keep_last", "train.max_consecutive_bad_steps", "parallel.timeout_minutes",
                "parallel.ddp_bucket_size"]
    non_negative = ["sources.num_ranks", "sources.precision_check_rows", "train.min_lr", "train.warmup_steps",
                    "train.weight_decay", "train.grad_clip", "train.seed"]
    for key in positive:
        if (value := get(key)) is not None and value <= 0:
            problems.append(f"{key}: must be > 0, got {value}")
    for key in non_negative:
        if get(key) < 0:
            problems.append(f"{key}: must be >= 0, got {get(key)}")
    if not 0 <= cfg.loss.wrpo_alpha <= 1:
        problems.append(f"loss.wrpo_alpha: must be in [0, 1], got {cfg.loss.wrpo_alpha}")
    problems += _loss_option_problems(cfg)
    for key in ["train.adam_beta1", "train.adam_beta2"]:
        if not 0 <= get(key) < 1:
            problems.append(f"{key}: must be in [0, 1), got {get(key)}")
    for key in ["data.path", "tokenizer.path", "run_dir"]:
        if not get(key).strip():
            problems.append(f"{key}: must not be empty")

    def divisible(numerator_key: str, denominator_key: str) -> None:
        numerator, denominator = get(numerator_key), get(denominator_key)
        if denominator is not None and numerator > 0 and denominator > 0 and numerator % denominator:
            problems.append(f"{numerator_key} ({numerator}) must be divisible by {denominator_key} ({denominator})")

    if cfg.model.kv_channels is None:  # the head size is hidden_size / num_attention_heads
        divisible("model.hidden_size", "model.num_attention_heads")
    divisible("model.num_attention_heads", "model.num_query_groups")
    problems += _model_problems(cfg.model, fp8=cfg.train.precision == Precision.fp8)
    divisible("train.global_batch_size", "train.micro_batch_size")
    train = cfg.train
    if train.warmup_steps >= train.steps > 0:  # Megatron's scheduler needs warmup < decay steps
        problems.append(f"train.warmup_steps ({train.warmup_steps}) must be < train.steps ({train.steps})")
    if train.min_lr > train.lr > 0:
        problems.append(f"train.lr ({train.lr}) must be >= train.min_lr ({train.min_lr})")
    data = cfg.data
    if (data.split is not None and data.eval_path is not None and (data.eval_split or data.split) == data.split
            and os.path.realpath(data.eval_path) == os.path.realpath(data.path)):
        problems.append(f"data.eval_split: data.eval_path is data.path's folder and its split (null: data.split) is "
                        f"the training split {data.split!r}: the held-out rows would be the training rows; set "
                        "data.eval_split (e.g. test)")
    max_prompt = cfg.data.max_prompt_length
    if max_prompt is not None and max_prompt >= cfg.model.seq_length:
        problems.append(f"data.max_prompt_length ({max_prompt}) must be < model.seq_length "
                        f"({cfg.model.seq_length}) to leave room for the response")
    if cfg.data.share_prompt and cfg.data.packing is False:
        problems.append("data.share_prompt: true needs packed micro-batches; set data.packing true or null")
    if cfg.data.pack_tokens is not None and cfg.data.pack_tokens > 0:
        from infifpo_mcore.losses import LOSSES  # here, and only then: checking a config should not import torch

        responses = len(LOSSES[cfg.loss.type].responses)
        if cfg.data.pack_tokens < responses * cfg.model.seq_length:
            problems.append(f"data.pack_tokens ({cfg.data.pack_tokens}) must be >= "
                            f"{responses * cfg.model.seq_length}, the {responses} sequences of model.seq_length "
                            f"({cfg.model.seq_length}) a pair of loss.type={cfg.loss.type} may take, so that every "
                            "pair fits a micro-batch")
    if train.precision == Precision.fp8:  # TE's FP8 GEMMs want every dimension a multiple of 16
        for key in ("model.seq_length", "model.hidden_size", "model.ffn_hidden_size"):
            if get(key) % 16:
                problems.append(f"{key} ({get(key)}): train.precision fp8 needs a multiple of 16 (FP8 GEMM shapes)")
    if cfg.checkpoint.save_interval is not None and cfg.checkpoint.save is None:
        problems.append("checkpoint.save_interval: set, but checkpoint.save (the directory) is null")
    if cfg.sources.num_ranks and not cfg.sources.models:
        problems.append(f"sources.num_ranks ({cfg.sources.num_ranks}): no sources.models to run on those ranks")
    if cfg.sources.num_ranks:
        from infifpo_mcore.losses import LOSSES  # here, and only then: checking a config should not import torch

        if not LOSSES[cfg.loss.type].uses_sources:
            users = " | ".join(name for name, spec in LOSSES.items() if spec.uses_sources)
            problems.append(f"sources.num_ranks ({cfg.sources.num_ranks}): loss.type={cfg.loss.type} uses no source "
                            f"scores; use 0, or loss.type {users}")
    if cfg.logging.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        problems.append("logging.wandb_project: set, but wandb is not installed (pip install wandb, or null)")
    names = [source.name for source in cfg.sources.models]
    for index, source in enumerate(cfg.sources.models):
        for key in ("name", "path"):
            if not getattr(source, key).strip():
                problems.append(f"sources.models[{index}].{key}: must not be empty")
        if source.name in names[:index]:
            problems.append(f"sources.models[{index}].name: {source.name!r} is used twice (names key the score cache)")
        if source.tensor_parallel and source.gguf_file:
            problems.append(f"sources.models[{index}].tensor_parallel: a GGUF source is not sharded; export it to a "
                            "HF directory first (infifpo_mcore.sources.export_gguf_as_hf) or set tensor_parallel false")
        if source.tensor_parallel and source.precision == Precision.fp8:
            problems.append(f"sources.models[{index}].tensor_parallel: FP8 sources (Transformer Engine layers) are "
                            "not sharded; use precision bf16 or tensor_parallel false")
    return problems


def _model_problems(model: ModelConfig, *, fp8: bool) -> list[str]:
    """Combinations of model.* keys the pivot cannot build."""
    problems = []
    if model.rope_scaling == RopeScaling.llama3:
        if model.rope_original_max_position_embeddings is None:
            problems.append("model.rope_original_max_position_embeddings: rope_scaling llama3 needs it (the context "
                            "the rotary base was trained for)")
        if model.rope_high_freq_factor <= model.rope_low_freq_factor:
            problems.append(f"model.rope_high_freq_factor ({model.rope_high_freq_factor}) must be > "
                            f"model.rope_low_freq_factor ({model.rope_low_freq_factor})")
    if model.window_layers is not None:
        if model.sliding_window is None:
            problems.append("model.window_layers: set, but model.sliding_window (the window) is null")
        if len(model.window_layers) != model.num_layers:
            problems.append(f"model.window_layers: {len(model.window_layers)} entries for model.num_layers "
                            f"{model.num_layers} (one per layer)")
    if model.local_rotary_base is not None and model.sliding_window is None:
        problems.append("model.local_rotary_base: set, but there are no sliding-window layers (model.sliding_window)")
    own_layer = [key for key in ("zero_centered_norms", "post_norms", "local_rotary_base")
                 if getattr(model, key) not in (None, False)]
    if own_layer and model.normalization != Normalization.RMSNorm:
        problems.append(f"model.{own_layer[0]}: needs model.normalization RMSNorm, got {model.normalization}")
    if fp8 and own_layer:
        problems.append(f"model.{own_layer[0]}: this layer is built from Megatron-Core's local modules, which have no "
                        "FP8 (train.precision fp8); use bf16")
    return problems


def _loss_option_problems(cfg: InfiFPOConfig) -> list[str]:
    """label_smoothing and sft_weight: their ranges, and the losses they mean something for (their LossSpec)."""
    loss, problems = cfg.loss, []
    if not (loss.label_smoothing or loss.sft_weight):
        return problems
    from infifpo_mcore.losses import LOSSES  # here, and only then: checking a config should not import torch

    spec = LOSSES[loss.type]
    if not 0 <= loss.label_smoothing < 0.5:
        problems.append(f"loss.label_smoothing: must be in [0, 0.5), got {loss.label_smoothing}")
    elif loss.label_smoothing and spec.margin_loss != "sigmoid":
        sigmoid = " | ".join(name for name, other in LOSSES.items() if other.margin_loss == "sigmoid")
        problems.append(f"loss.label_smoothing ({loss.label_smoothing}): loss.type={loss.type} has no sigmoid to "
                        f"smooth; use 0, or loss.type {sigmoid}")
    if loss.sft_weight < 0:
        problems.append(f"loss.sft_weight: must be >= 0, got {loss.sft_weight}")
    elif loss.sft_weight and spec.margin_loss is None:
        problems.append(f"loss.sft_weight ({loss.sft_weight}): loss.type={loss.type} is the NLL itself; the weight "
                        "adds it to a preference loss (use 0)")
    return problems


def load_config(*, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> InfiFPOConfig:
    """Defaults, then the YAML file at `path` (if any), then `overrides` (`key.sub=value`, later wins).

    Raises ConfigError listing every problem found (unknown keys, wrong types, disallowed values, bad sizes).
    """
    merged = OmegaConf.structured(InfiFPOConfig)
    problems: list[str] = []
    inputs = [(os.fspath(path), _read_yaml(path, problems))] if path is not None else []
    inputs += [(f"override {override!r}", _parse_override(override, problems)) for override in overrides]
    for origin, tree in inputs:
        for key, value in _flatten(tree):
            problems += _apply(merged, key=key, value=value, origin=origin)
    try:
        cfg = OmegaConf.to_object(merged)  # also resolves ${...} interpolations
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        raise ConfigError(problems + [f"{key}: cannot resolve: {str(error).splitlines()[0]}"]) from None
    problems += _value_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def validate_layout(cfg: InfiFPOConfig, *, world_size: int) -> int:
    """Check that the process layout fits `world_size` ranks; returns the data-parallel size of the pivot.

    Training ranks = world_size - sources.num_ranks = parallel.tensor x parallel.pipeline x data-parallel size.
    """
    if world_size < 1:
        raise ConfigError([f"world size must be >= 1, got {world_size}"])
    tensor, pipeline, virtual = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline
    model, train = cfg.model, cfg.train
    problems = []
    training_ranks = world_size - cfg.sources.num_ranks
    ranks_per_replica = tensor * pipeline
    data_parallel = training_ranks // ranks_per_replica
    if training_ranks < 1:
        problems.append(f"sources.num_ranks ({cfg.sources.num_ranks}) leaves no training ranks "
                        f"in a world of {world_size}")
    elif training_ranks % ranks_per_replica:
        problems.append(f"parallel.tensor ({tensor}) x parallel.pipeline ({pipeline}) = {ranks_per_replica} must "
                        f"divide the {training_ranks} training ranks (world size {world_size} - "
                        f"sources.num_ranks {cfg.sources.num_ranks})")
    elif train.micro_batch_size is None and train.global_batch_size % data_parallel:
        problems.append(f"train.global_batch_size ({train.global_batch_size}) must be divisible by the "
                        f"data-parallel size ({data_parallel})")
    elif train.micro_batch_size is not None and train.global_batch_size % (train.micro_batch_size * data_parallel):
        problems.append(f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
                        f"train.micro_batch_size ({train.micro_batch_size}) x data-parallel size "
                        f"({data_parallel}) = {train.micro_batch_size * data_parallel}")
    if cfg.parallel.overlap_param_gather and not resolve_distributed_optimizer(cfg, data_parallel=data_parallel):
        problems.append(f"parallel.overlap_param_gather: needs the distributed optimizer, which "
                        f"parallel.distributed_optimizer={cfg.parallel.distributed_optimizer} turns off at data-parallel "
                        f"size {data_parallel}; set it to true")
    if virtual is not None and pipeline < 2:
        problems.append(f"parallel.virtual_pipeline ({virtual}) needs parallel.pipeline > 1, got {pipeline}")
    elif virtual is not None and train.micro_batch_size and not problems:
        micro_batches = train.global_batch_size // (train.micro_batch_size * data_parallel)
        if micro_batches % pipeline:  # Megatron's interleaved schedule runs them in groups of PP
            problems.append(f"parallel.virtual_pipeline ({virtual}): the {micro_batches} micro-batches per step "
                            f"(train.global_batch_size / (train.micro_batch_size x data-parallel size)) must be a "
                            f"multiple of parallel.pipeline ({pipeline})")
    elif virtual is not None and not problems and (train.global_batch_size // data_parallel) % pipeline:
        problems.append(f"parallel.virtual_pipeline ({virtual}): the {train.global_batch_size // data_parallel} pairs "
                        f"per data-parallel rank and step (train.global_batch_size / data-parallel size) must be a "
                        f"multiple of parallel.pipeline ({pipeline}), to make whole groups of PP micro-batches")
    stages = pipeline * (virtual or 1)
    if model.num_layers % stages:
        per_stage = f" x parallel.virtual_pipeline ({virtual})" if virtual else ""
        problems.append(f"model.num_layers ({model.num_layers}) must be divisible by "
                        f"parallel.pipeline ({pipeline}){per_stage}")
    if model.max_position_embeddings is not None and model.seq_length > model.max_position_embeddings:
        problems.append(f"model.seq_length ({model.seq_length}) exceeds the model's position limit "
                        f"model.max_position_embeddings ({model.max_position_embeddings})")
    for key in ["num_attention_heads", "num_query_groups", "ffn_hidden_size"]:
        if getattr(model, key) % tensor:
            problems.append(f"model.{key} ({getattr(model, key)}) must be divisible by parallel.tensor ({tensor})")
    if problems:
        raise ConfigError(problems)
    return data_parallel


def fp8_missing(device) -> list[str]:
    """Why FP8 matmuls cannot run on ``device`` (a torch.device): empty when an FP8 GPU (Hopper, Ada) and
    Transformer Engine are both there."""
    import torch  # here, not at the top: loading and checking a config should not pay for importing torch

    missing = []
    if device.type != "cuda":
        missing.append("no CUDA device")
    elif torch.cuda.get_device_capability(device) < (8, 9):
        missing.append(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (compute capability < 8.9)")
    if importlib.util.find_spec("transformer_engine") is None:
        missing.append("Transformer Engine is not installed")
    return missing


def resolve_precision(precision: Precision | str, *, device, what: str) -> str:
    """'fp32', 'bf16' or 'fp8': what a configured precision (the pivot's or a source's, named ``what`` in errors)
    means on ``device`` (a torch.device). auto: bf16 on a CUDA device that supports it, else fp32. fp8 without an
    FP8 GPU and Transformer Engine raises ConfigError with the reason rather than fall back: the numbers would
    differ."""
    import torch

    if precision == Precision.auto:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == Precision.fp8 and (missing := fp8_missing(device)):
        raise ConfigError([f"{what}: fp8 needs an FP8 GPU (Hopper, Ada) with Transformer Engine; here: "
                           f"{'; '.join(missing)}. Use bf16 or auto."])
    return Precision(precision).value


def resolve_distributed_optimizer(cfg: InfiFPOConfig, *, data_parallel: int) -> bool:
    """``parallel.distributed_optimizer``: true, false, or auto = on when the optimizer state has ranks to be sharded
    over (data parallel > 1)."""
    setting = cfg.parallel.distributed_optimizer
    return data_parallel > 1 if setting == Switch.auto else setting == Switch.true


def to_dict(cfg: InfiFPOConfig) -> dict[str, Any]:
    """Nested plain dict (enum fields as their string values), for saving and logging."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {
        name: value.value if isinstance(value, Enum) else value for name, value in items})


def save_config(cfg: InfiFPOConfig, *, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML that `load_config(path=...)` reads back to an equal config."""
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(to_dict(cfg), file, sort_keys=False)
