"""Reference columns: which ones a loss needs (its spec, the same decision the loss makes), where each comes from
(cached fields, the checkpoint, the online stream), how they reach a batch, and the rows whose reference would
compare another text than the pivot sees."""

import itertools
import json

import pytest
import torch

from infifpo_mcore.config import ConfigError, LossType, load_config
from infifpo_mcore.data import DataError, collate_pairs
from infifpo_mcore.losses import LOSSES, LossOptions, compute_loss
from infifpo_mcore.references import References, load_splits, needed_keys
from infifpo_mcore.source_group import SourceGroupError, _scores_message, unpack_scores
from infifpo_mcore.tokenization import build_tokenizer

CPU = torch.device("cpu")
ONE_SOURCE = "sources.models=[{name: a, path: /models/a}]"
LONG_ANSWER = " ".join(["one two three four five six seven eight nine ten"] * 4)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(type="sentencepiece", path="pkg://mistral_common/data/tokenizer.model.v1",
                           chat_template="mistral")


def write_rows(path, *rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(prompt="What is 2 + 2?", chosen="It is 4.", rejected="It is 5.", **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def fused(chosen, rejected, mean_chosen, mean_rejected):
    return {"fuse_chosen_logps": chosen, "fuse_rejected_logps": rejected,
            "fuse_mean_chosen_logps": mean_chosen, "fuse_mean_rejected_logps": mean_rejected}


def config(path, *overrides, eval_path=None):
    return load_config(overrides=[f"data.path={path}", f"data.eval_path={eval_path or 'null'}",
                                  "model.seq_length=64", *overrides])


def references(cfg, tokenizer):
    train, held_out = load_splits(cfg, tokenizer=tokenizer)
    return References(cfg=cfg, datasets={"train": train, **({"eval": held_out} if held_out else {})})


# --------------------------------------------------------------------------------------------------------------------
# The loss spec decides; the loss agrees
def _all_logps(rows: int = 3, sources: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logps = {}
    for response in ("chosen", "rejected", "chosen_pivot"):
        logps[f"policy_{response}_logps"] = -torch.rand(rows, generator=generator) * 20
        logps[f"policy_{response}_lengths"] = torch.randint(1, 9, (rows,), generator=generator).float()
        logps[f"init_{response}_logps"] = -torch.rand(rows, generator=generator) * 20
    for kind in ("chosen", "rejected"):
        logps[f"source_{kind}_logps"] = -torch.rand(rows, sources, generator=generator) * 20
        logps[f"source_{kind}_lengths"] = torch.randint(1, 9, (rows, sources), generator=generator).float()
    return logps


FLAGS = [dict(zip(("length_norm", "clip", "fusion", "include_pivot_init"), values))
         for values in itertools.product((False, True), (False, True), ("mean", "max_margin"), (False, True))]


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
@pytest.mark.parametrize("flags", FLAGS, ids=lambda flags: "-".join(f"{k}={v}" for k, v in flags.items()))
def test_the_spec_names_exactly_the_reference_columns_its_loss_reads(loss_type, flags):
    """Every loss computes from the policy scores plus ``needed_keys``, and refuses without any one of those (the
    sources' token counts travel with their scores, and are read with length_norm only): the trainer's decision
    (what to score, what to join) is the loss's. max_margin without clip or include_pivot_init needs the pivot init
    too (its margin picks the source): the case the trainer used to miss (issue #16, 1)."""
    spec, options = LOSSES[loss_type], LossOptions(beta=0.5, **flags)
    needed = needed_keys(spec, options)
    everything = _all_logps()
    policy = {key: value for key, value in everything.items()
              if key.startswith("policy_") and key.split("_", 1)[1].rsplit("_", 1)[0] in spec.responses}
    kwargs = dict(loss_type=loss_type, beta=0.5, wrpo_alpha=0.3, **flags)
    loss, metrics = compute_loss(logps=policy | {key: everything[key] for key in needed}, **kwargs)
    assert loss.isfinite().all() and set(spec.metrics) <= metrics.keys()
    read = [key for key in needed if spec.options_for(options).length_norm or not key.endswith("_lengths")]
    for key in read:
        with pytest.raises(ValueError, match=f"needs {key}"):
            compute_loss(logps=policy | {other: everything[other] for other in needed if other != key}, **kwargs)
    if loss_type == "infifpo" and flags["fusion"] == "max_margin":
        assert "init_chosen_logps" in needed


def test_every_configurable_loss_type_has_a_spec():
    assert {loss_type.value for loss_type in LossType} == set(LOSSES)


# --------------------------------------------------------------------------------------------------------------------
# Cached columns and the join
def test_cached_scores_reach_the_batch_as_the_loss_needs_them(tmp_path, tokenizer):
    path = write_rows(tmp_path / "prefs.jsonl",
                      row(ref_chosen_logps=-3.0, ref_rejected_logps=-4.0,
                          **fused([-2.0, -6.0], [-3.0, -1.0], [-1.0, -2.0], [-1.5, -0.5])),
                      row(prompt="Hi", ref_chosen_logps=-1.0, ref_rejected_logps=-2.5,
                          **fused([-4.0, -1.0], [-2.0, -3.0], [-0.5, -0.25], [-2.0, -1.0])))
    refs = references(config(path, "loss.type=infifpo", "loss.clip=true"), tokenizer)
    train = refs.datasets["train"]
    batch = collate_pairs([train[1], train[0]], seq_length=64, pad_id=tokenizer.pad_id)
    refs.join(batch, "train", device=CPU)
    reference = batch["reference"]
    assert batch["row_ids"].tolist() == [1, 0]
    assert reference["init_chosen_logps"].tolist() == [-1.0, -3.0]
    assert reference["init_rejected_logps"].tolist() == [-2.5, -4.0]
    assert reference["source_chosen_logps"].tolist() == [[-4.0, -1.0], [-2.0, -6.0]]
    assert reference["source_chosen_lengths"].tolist() == [[8.0, 4.0], [2.0, 3.0]]  # sum / mean
    assert reference["source_rejected_lengths"].tolist() == [[1.0, 3.0], [2.0, 2.0]]
    assert refs.unscored_responses("train") == []
    # What a loss does not read does not reach its batches: DPO gets the init only, InfiFPO without clip the sources
    for overrides, keys in ((["loss.type=dpo"], {"init_chosen_logps", "init_rejected_logps"}),
                            (["loss.type=infifpo", "loss.clip=false"], {"source_chosen_logps",
                                                                        "source_rejected_logps",
                                                                        "source_chosen_lengths",
                                                                        "source_rejected_lengths"})):
        refs = references(config(path, *overrides), tokenizer)
        batch = collate_pairs([train[0]], seq_length=64, pad_id=tokenizer.pad_id)
        refs.join(batch, "train", device=CPU)
        assert set(batch["reference"]) == keys


def test_wrpo_scores_every_response_itself_and_a_fused_loss_without_source_scores_is_refused(tmp_path, tokenizer):
    path = write_rows(tmp_path / "prefs.jsonl", row(chosen_pivot="Four.", ref_chosen_logps=-3.0,
                                                    ref_rejected_logps=-4.0))
    refs = references(config(path, "loss.type=wrpo"), tokenizer)
    assert refs.unscored_responses("train") == ["chosen", "rejected", "chosen_pivot"]  # ref_* unused: one origin
    with pytest.raises(ConfigError, match=r"loss.type=fpo needs source scores \(fuse_\* fields\) in .*prefs.jsonl"):
        references(config(path, "loss.type=fpo"), tokenizer)
    scored = write_rows(tmp_path / "scored.jsonl", row(**fused([-2.0], [-3.0], [-1.0], [-1.5])))
    with pytest.raises(ConfigError, match="carries source scores .* would score them again online"):
        references(config(scored, "sources.num_ranks=1", ONE_SOURCE), tokenizer)


def test_checkpointed_scores_keep_the_layout_of_earlier_runs(tmp_path, tokenizer):
    """pivot_init_scores.safetensors as runs have written it: the train split's unprefixed, the held-out split's
    under eval/. They load into the columns, take the place of scoring, and are saved back the same way."""
    train = write_rows(tmp_path / "train.jsonl", row(), row(prompt="Hi"), row(prompt="Yo"))
    held_out = write_rows(tmp_path / "eval.jsonl", row(prompt="Eh"), row(prompt="Oh"))
    cfg = config(train, "loss.type=dpo", eval_path=held_out)
    refs = references(cfg, tokenizer)
    assert refs.unscored_responses("train") == refs.unscored_responses("eval") == ["chosen", "rejected"]
    saved = {"chosen_logps": torch.tensor([-1.0, -2.0, -3.0]), "rejected_logps": torch.tensor([-4.0, -5.0, -6.0]),
             "eval/chosen_logps": torch.tensor([-7.0, -8.0]), "eval/rejected_logps": torch.tensor([-9.0, -10.0])}
    refs.load_state_dict(saved, where="ckpt")
    assert refs.unscored_responses("train") == refs.unscored_responses("eval") == []
    batch = collate_pairs([refs.datasets["eval"][1]], seq_length=64, pad_id=tokenizer.pad_id)
    refs.join(batch, "eval", device=CPU)
    assert batch["reference"]["init_rejected_logps"].tolist() == [-10.0]
    assert {key: value.tolist() for key, value in refs.state_dict().items()} == \
        {key: value.tolist() for key, value in saved.items()}
    with pytest.raises(ConfigError, match="ckpt holds pivot-init scores of 2 train rows, the data .* has 3"):
        references(cfg, tokenizer).load_state_dict({"chosen_logps": torch.zeros(2)}, where="ckpt")


# --------------------------------------------------------------------------------------------------------------------
# Issue #16, 5: a response cut to fit while its reference scores cover the whole text
def test_a_cut_response_whose_reference_covers_the_whole_text_is_a_problem_of_its_row(tmp_path, tokenizer):
    scores = fused([-20.0], [-30.0], [-1.0], [-1.5])
    path = write_rows(tmp_path / "prefs.jsonl", row(**scores), row(chosen=LONG_ANSWER, **scores))
    short = ["model.seq_length=32", "loss.type=infifpo"]
    with pytest.raises(DataError) as caught:
        load_splits(config(path, *short), tokenizer=tokenizer)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:2 chosen: ") and "fit model.seq_length=32" in problem
    assert "(cached fuse_*) cover the whole response" in problem
    train, _ = load_splits(config(path, *short, "data.skip_invalid_rows=true"), tokenizer=tokenizer)
    assert len(train) == 1 and train.skipped == [problem]

    # The pivot init scores the cut text itself: nothing to refuse. Cached ref_* scores cover the whole text.
    plain = write_rows(tmp_path / "plain.jsonl", row(), row(chosen=LONG_ANSWER))
    train, _ = load_splits(config(plain, "model.seq_length=32", "loss.type=dpo"), tokenizer=tokenizer)
    assert len(train) == 2 and train.num_truncated == 1
    cached = write_rows(tmp_path / "cached.jsonl", row(ref_chosen_logps=-3.0, ref_rejected_logps=-4.0),
                        row(chosen=LONG_ANSWER, ref_chosen_logps=-3.0, ref_rejected_logps=-4.0))
    with pytest.raises(DataError, match=r"cached.jsonl:2 chosen: .*\(cached ref_\*\) cover the whole response"):
        load_splits(config(cached, "model.seq_length=32", "loss.type=dpo"), tokenizer=tokenizer)
    # WRPO scores every response with the pivot init (ref_* unused), online sources score the whole text
    wrpo = write_rows(tmp_path / "wrpo.jsonl", *(json.loads(line) | {"chosen_pivot": "Four."}
                                                 for line in cached.read_text().splitlines()))
    train, _ = load_splits(config(wrpo, "model.seq_length=32", "loss.type=wrpo"), tokenizer=tokenizer)
    assert len(train) == 2
    with pytest.raises(DataError, match=r"plain.jsonl:2 chosen: .*\(the online source ranks'\) cover the whole"):
        load_splits(config(plain, "model.seq_length=32", "sources.num_ranks=1", ONE_SOURCE), tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# Issue #16, 2: the rows scored online are the rows trained on
class _Delivered:
    """Stands in for the bridge: ``next_batch`` hands over a message the source leader built (the real one)."""

    def __init__(self, message):
        self.message = message

    def next_batch(self, *, step):
        return self.message


def test_streamed_scores_are_checked_row_by_row_against_the_rows_trained_on(tmp_path, tokenizer):
    path = write_rows(tmp_path / "prefs.jsonl", row(), row(prompt="Hi"), row(prompt="Yo"))
    refs = references(config(path, "loss.type=infifpo", "loss.clip=false", "sources.num_ranks=1", ONE_SOURCE),
                      tokenizer)
    rows = refs.datasets["train"].rows
    table = -torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4, 1)
    message = _scores_message([2, 0, 1], [rows[2], rows[0], rows[1]], table)
    refs.stream_from(_Delivered(message))
    refs.take_stream_batch(step=0, rows=[0], data_rank=1, data_size=2)  # this rank's share: every 2nd from 1
    assert refs.tables["train"]["source_chosen_logps"][:, 0].tolist() == [-5.0, -9.0, -1.0]
    with pytest.raises(SourceGroupError, match="replayed another data order"):
        refs.take_stream_batch(step=0, rows=[1], data_rank=1, data_size=2)

    # A source side that loaded other rows (here: row 2 missing, as when it kept an invalid row the trainer skips)
    other = write_rows(tmp_path / "other.jsonl", row(), row(prompt="Yo"), row(prompt="Hi"))
    other_rows = references(config(other, "loss.type=dpo"), tokenizer).datasets["train"].rows
    wrong = _scores_message([0, 1, 2], other_rows, table)
    with pytest.raises(SourceGroupError, match=rf"2 row\(s\) .* e.g. dataset row 1 \({path}:2\), dataset row 2"):
        unpack_scores(wrong, dataset=refs.datasets["train"], path=str(path), num_sources=1, what="step 0")


def test_a_run_from_other_weights_drops_the_cached_init_scores_and_scores_them_itself(tmp_path, tokenizer):
    """The recipe's preference stage starts from an SFT run's weights: the data's ref_* describe another model."""
    path = write_rows(tmp_path / "prefs.jsonl", row(ref_chosen_logps=-3.0, ref_rejected_logps=-4.0,
                                                    **fused([-2.0], [-3.0], [-1.0], [-1.5])))
    refs = references(config(path, "loss.type=infifpo", "loss.clip=true", eval_path=path), tokenizer)
    assert refs.unscored_responses("train") == []
    assert refs.drop_cached_init() == ["train", "eval"]
    assert refs.unscored_responses("train") == refs.unscored_responses("eval") == ["chosen", "rejected"]
    assert "source_chosen_logps" in refs.tables["train"]  # the sources' scores stay
    sft = references(config(path, "loss.type=sft"), tokenizer)
    assert sft.needed == () and sft.unscored_responses("train") == [] and sft.drop_cached_init() == []
