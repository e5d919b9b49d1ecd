"""Checkpoint root bookkeeping on plain directories: which checkpoint loads, what a restart removes, what
keep_last prunes, and the allow-list for pickled metadata; a save step that fails on one rank fails on all.
(Saving and loading real Megatron checkpoints, and crafted ones: tests/reliability/.)"""

from pathlib import Path

import pytest

from tests.distributed import run_distributed

from infifpo_mcore.checkpointing import (CheckpointError, _allowed_global, prune_checkpoints, remove_incomplete,
                                         resolve_checkpoint)


def make_checkpoint(root, step):
    directory = root / f"iter_{step:07d}"
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text("{}")
    return directory


def test_latest_names_the_checkpoint_to_load(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)  # complete but never published (killed between rename and pointer)
    (tmp_path / "latest").write_text("iter_0000002")
    assert resolve_checkpoint(tmp_path) == tmp_path / "iter_0000002"
    assert resolve_checkpoint(tmp_path / "iter_0000004") == tmp_path / "iter_0000004"  # named explicitly
    (tmp_path / "latest").write_text("iter_0000009")
    with pytest.raises(CheckpointError, match="names 'iter_0000009', which is not a checkpoint directory"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no metadata.json"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_a_restart_removes_unpublished_saves_and_restores_a_set_aside_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 2)
    staging = make_checkpoint(tmp_path, 3).rename(tmp_path / "iter_0000003.tmp")
    (tmp_path / "latest.tmp").write_text("iter_0000003")
    # killed while a new save of step 4 replaced the published one: only the set-aside copy exists
    make_checkpoint(tmp_path, 4).rename(tmp_path / "iter_0000004.replaced")
    (tmp_path / "latest").write_text("iter_0000004")
    assert resolve_checkpoint(tmp_path) == tmp_path / "iter_0000004.replaced"  # loadable even before the restart
    assert remove_incomplete(tmp_path) == [staging, tmp_path / "latest.tmp"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
    assert resolve_checkpoint(tmp_path) == tmp_path / "iter_0000004"


def test_keep_last_prunes_older_published_checkpoints_only(tmp_path):
    for step in (1, 2, 3, 5, 9):
        make_checkpoint(tmp_path, step)
    published = tmp_path / "iter_0000005"
    removed = prune_checkpoints(tmp_path, keep_last=2, published=published)
    assert [path.name for path in removed] == ["iter_0000001", "iter_0000002"]
    # iter_0000009 is newer than what was just published: left by an abandoned run, replaced when reached
    assert sorted(path.name for path in tmp_path.iterdir()) == ["iter_0000003", "iter_0000005", "iter_0000009"]
    assert prune_checkpoints(tmp_path, keep_last=1, published=published) == [tmp_path / "iter_0000003"]


@pytest.mark.parametrize("module, name, allowed", [
    ("torch.distributed.checkpoint.metadata", "Metadata", True),
    ("torch.distributed.checkpoint.planner", "WriteItemType", True),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo", True),
    ("torch", "Size", True),
    ("torch", "bfloat16", True),
    ("torch", "load", False),
    ("torch.distributed.checkpoint.metadata", "os.system", False),  # a dotted name walks attributes
    ("torch.distributed.checkpoint.metadata", "dataclass", False),  # imported there, defined elsewhere
    ("posix", "system", False),
    ("builtins", "eval", False),
])
def test_the_metadata_allow_list(module, name, allowed):
    assert _allowed_global(module, name) is allowed


def test_shapes_must_match_except_the_vocabulary_padding(tmp_path):
    from types import SimpleNamespace

    import torch
    from megatron.core.dist_checkpointing import ShardedTensor

    from infifpo_mcore.checkpointing import _check_shapes

    def stored(**shapes):
        return SimpleNamespace(state_dict_metadata={key: SimpleNamespace(size=torch.Size(shape))
                                                    for key, shape in shapes.items()})

    embedding = ShardedTensor.from_rank_offsets("embedding", torch.zeros(32256, 8))
    embedding.allow_shape_mismatch = True  # as Megatron marks vocabulary-sized tensors
    template = {"model": {"embedding": embedding, "norm": ShardedTensor.from_rank_offsets("norm", torch.zeros(8))}}
    _check_shapes(tmp_path, stored(embedding=(32000, 8), norm=(8,)), template, vocab_size=32000)  # other padding
    with pytest.raises(CheckpointError, match=r"embedding: shape \(31000, 8\) in the checkpoint, \(32256, 8\)"):
        _check_shapes(tmp_path, stored(embedding=(31000, 8), norm=(8,)), template, vocab_size=32000)
    with pytest.raises(CheckpointError, match=r"does not fit this model \(2 tensor\(s\)\)(.|\n)*"
                                              r"embedding: shape \(32000, 16\)(.|\n)*norm: missing"):
        _check_shapes(tmp_path, stored(embedding=(32000, 16)), template, vocab_size=32000)


def test_publishing_replaces_a_published_step_without_a_moment_of_nothing_to_load(tmp_path):
    from infifpo_mcore.checkpointing import _publish

    old = make_checkpoint(tmp_path, 5)
    (tmp_path / "latest").write_text("iter_0000005")
    staging = make_checkpoint(tmp_path, 6).rename(tmp_path / "iter_0000005.tmp")  # a new run re-saving step 5
    (staging / "new").write_text("")
    _publish(staging, old)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["iter_0000005", "latest"]
    assert (old / "new").is_file() and resolve_checkpoint(tmp_path) == old


def _publish_fails_on_rank_0(ctx, *, root: str) -> None:
    from infifpo_mcore import checkpointing
    from infifpo_mcore.config import ModelConfig
    from infifpo_mcore.model import build_pivot, build_transformer_config

    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=64,
                        vocab_size=128)
    config = build_transformer_config(model=model, tensor=1, pipeline=1, precision="fp32")
    chunks = build_pivot(model=model, config=config, vocab_size=128, device=ctx.device)

    def full_disk(staging: Path, final: Path) -> None:
        raise OSError(28, "No space left on device", str(final))

    checkpointing._publish = full_disk  # in this worker process only; rank 0 is the one that publishes
    with pytest.raises(CheckpointError, match=r"publishing .*iter_0000003 failed \(rank 0: OSError: \[Errno 28\] "
                                              r"No space left on device"):
        checkpointing.save_checkpoint(root=Path(root), step=3, model_chunks=chunks, optimizer=None,
                                      train_state=None, init_scores=None)
    assert not (Path(root) / "latest").exists()


@pytest.mark.distributed
def test_a_publish_that_fails_on_rank_0_raises_on_every_rank_instead_of_leaving_them_waiting(tmp_path):
    """Issue #16, 4: the other ranks used to wait for rank 0 at a barrier it never reached (here they would time
    out after 0.5 minutes and the test fail); now every rank raises the CheckpointError naming rank 0's error."""
    run_distributed(_publish_fails_on_rank_0, world_size=2, timeout_minutes=0.5, root=str(tmp_path / "ckpt"))
