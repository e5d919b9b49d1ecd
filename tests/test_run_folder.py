"""Issue #20, 1: a run folder holds one run. Rerunning its command continues it from its newest complete checkpoint
and drops what was logged after that step; another config is refused by key; --fresh replaces the run; a finished
run says so. (The same under torchrun, with real checkpoints: tests/reliability/test_resume.py.)"""

import json

import pytest

from infifpo_mcore.config import load_config, save_config
from infifpo_mcore.run_folder import (RunFinished, RunFolderError, config_differences, plan_start, prepare_folder,
                                      record_config, resume_command)


def config(run_dir, *overrides):
    return load_config(overrides=[f"run_dir={run_dir}", "checkpoint.save=${run_dir}/checkpoints", "train.steps=10",
                                  *overrides])


def publish(root, step):
    """A published checkpoint as far as the run folder looks: an iteration directory and the pointer to it."""
    directory = root / f"iter_{step:07d}"
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text("{}")
    (root / "latest").write_text(directory.name)
    return directory


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def held(tmp_path):
    """A folder whose run saved step 4, then logged steps 5 and 6 (with a skipped step and evaluation dumps) before
    it was killed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(config(run_dir), path=run_dir / "config.yaml")
    publish(run_dir / "checkpoints", 2)
    publish(run_dir / "checkpoints", 4)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "loss": 1 / step}) + "\n"
                                                   for step in range(1, 7)))
    (run_dir / "skipped_steps.jsonl").write_text(json.dumps({"step": 3}) + "\n" + json.dumps({"step": 5}) + "\n")
    (run_dir / "eval_rows").mkdir()
    for step in (0, 4, 6):
        (run_dir / "eval_rows" / f"step_{step:06d}.jsonl").write_text("{}\n")
    (run_dir / "wandb_run_id").write_text("abc123")
    (run_dir / "notes.txt").write_text("mine")
    return run_dir


def test_a_folder_without_a_run_starts_one_and_records_its_config(tmp_path):
    cfg = config(tmp_path / "run")
    start = plan_start(cfg, fresh=False)
    assert (start.held_run, start.fresh, start.resume_from, start.step) == (False, False, None, 0)
    assert start.describe(steps=10) == f"run_dir {tmp_path / 'run'}: a new run"
    prepare_folder(start, cfg)
    assert list((tmp_path / "run").iterdir()) == []  # the record comes when training starts (record_config)
    record_config(cfg)
    assert load_config(path=tmp_path / "run" / "config.yaml") == cfg


def test_the_same_command_resumes_from_the_newest_checkpoint_and_drops_what_was_logged_after_it(held):
    # train.steps (extended), the layout and logging may change; what is trained may not
    cfg = config(held, "train.steps=20", "parallel.tensor=2", "logging.eval_rows=true", "train.eval_interval=5")
    start = plan_start(cfg, fresh=False)
    assert (start.resume_from, start.step) == (held / "checkpoints" / "iter_0000004", 4)
    assert start.describe(steps=20).startswith(f"run_dir {held}: resuming its run from step 4 of 20 (")
    prepare_folder(start, cfg)
    assert [entry["step"] for entry in lines(held / "metrics.jsonl")] == [1, 2, 3, 4]
    assert lines(held / "skipped_steps.jsonl") == [{"step": 3}]
    assert sorted(path.name for path in (held / "eval_rows").iterdir()) == ["step_000000.jsonl", "step_000004.jsonl"]
    assert (held / "wandb_run_id").read_text() == "abc123"  # the W&B run continues
    assert sorted(path.name for path in (held / "checkpoints").iterdir()) == ["iter_0000002", "iter_0000004", "latest"]


def test_another_config_in_the_folder_is_refused_naming_each_key(held):
    with pytest.raises(RunFolderError) as caught:
        plan_start(config(held, "loss.type=dpo", "loss.beta=0.5", "train.steps=20", "parallel.pipeline=2"),
                   fresh=False)
    message = str(caught.value)
    assert message.startswith(f"{held} holds another run: its config.yaml differs from this config in\n")
    assert '  - loss.beta: 0.1 there, 0.5 here\n  - loss.type: "infifpo" there, "dpo" here\n' in message
    assert "train.steps" not in message and "parallel.pipeline" not in message
    assert f"run_dir={held}-2" in message and "--fresh" in message
    assert caught.value.label == "config error" and caught.value.exit_code == 2


def test_config_differences_ignore_only_what_may_change_on_resume():
    base = load_config()
    assert config_differences(base, load_config(overrides=["train.steps=99", "parallel.tensor=2",
                                                           "logging.wandb_project=x", "run_dir=elsewhere",
                                                           "checkpoint.keep_last=2"])) == []
    assert config_differences(base, load_config(overrides=["train.lr=0.1", "checkpoint.load=/ckpt",
                                                           "data.skip_invalid_rows=true"])) == [
        'checkpoint.load: null there, "/ckpt" here', "data.skip_invalid_rows: false there, true here",
        "train.lr: 0.001 there, 0.1 here"]


def test_fresh_replaces_the_run_and_keeps_what_is_not_the_run(held):
    cfg = config(held, "loss.type=dpo")  # any config: the previous one is not compared
    start = plan_start(cfg, fresh=True)
    assert (start.fresh, start.resume_from) == (True, None)
    assert "--fresh" in start.describe(steps=10)
    prepare_folder(start, cfg)
    assert sorted(path.name for path in held.iterdir()) == ["checkpoints", "notes.txt"]
    assert list((held / "checkpoints").iterdir()) == []
    assert not plan_start(cfg, fresh=False).held_run  # rerun without --fresh before it trained: a new run


def test_fresh_never_deletes_the_checkpoint_the_run_starts_from(held):
    cfg = config(held, f"checkpoint.load={held / 'checkpoints' / 'iter_0000002'}")
    with pytest.raises(RunFolderError, match="is inside checkpoint.save=.*whose checkpoints --fresh deletes"):
        plan_start(cfg, fresh=True)


def test_a_finished_run_is_nothing_to_train_which_is_no_failure(held):
    publish(held / "checkpoints", 10)
    with pytest.raises(RunFinished) as caught:
        plan_start(config(held), fresh=False)
    assert caught.value.exit_code == 0
    assert str(caught.value).startswith(f"the run in {held} has finished: its checkpoint {held}/checkpoints/"
                                        "iter_0000010 is at step 10 of train.steps=10. To train it further, raise "
                                        "train.steps")


def test_a_run_without_a_checkpoint_starts_again_and_logs_each_step_once(held):
    cfg = config(held, "checkpoint.save=null")
    save_config(cfg, path=held / "config.yaml")
    start = plan_start(cfg, fresh=False)
    assert (start.held_run, start.resume_from, start.step) == (True, None, 0)
    assert "saved no checkpoint; starting it again from step 0" in start.describe(steps=10)
    prepare_folder(start, cfg)
    assert (held / "metrics.jsonl").read_text() == "" and not (held / "eval_rows" / "step_000000.jsonl").exists()
    assert not (held / "wandb_run_id").exists()  # a new W&B run: the old one has these steps already


def test_the_resume_command_is_the_command_without_fresh():
    argv = ["launch/pretrain_infifpo.py", "--fresh", "--config", "my config.yaml", "loss.beta=0.2"]
    assert resume_command(argv, local_world_size=4, world_size=4) == (
        "torchrun --nproc_per_node 4 launch/pretrain_infifpo.py --config 'my config.yaml' loss.beta=0.2")
    assert "same command as this job's" in resume_command(argv, local_world_size=8, world_size=16)
