"""README.md's commands work as written (issue #20, 4). They are read from the README itself, so the page and the test
cannot drift; runs append overrides only to be short (fewer steps and rows) and to write into a scratch folder, which
sees the repository's launch/ and checkpoints_tools/ through links, so the relative paths resolve as from a clone."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from infifpo_mcore.config import InfiFPOConfig, load_config, validate_layout
from tests.distributed import free_port
from tests.launcher import REPO

README = REPO / "README.md"
SET_UP, WALKTHROUGH = "Set-up: two commands", "Fuse your own models"


def readme_commands(section: str) -> list[str]:
    """The shell commands of the README section's ```bash blocks: continuation lines joined, comments dropped, each
    ``&&`` link a command of its own."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no section '## {section}'"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", match.group(1), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands += [" ".join(part.split()) for part in line.split("&&")]
    return commands


def _words(command: str) -> list[str]:
    return shlex.split(command)


def _trainer_config(command: str) -> tuple[InfiFPOConfig, int]:
    """The config a ``torchrun ... launch/pretrain_infifpo.py`` command trains with, and its world size."""
    words = _words(command)
    nproc = int(words[words.index("--nproc_per_node") + 1])
    entry = words.index("launch/pretrain_infifpo.py")
    rest = words[entry + 1:]
    config = rest[rest.index("--config") + 1] if "--config" in rest else "launch/configs/tiny_cpu.yaml"
    overrides = [word for word in rest if "=" in word and not word.startswith("-")]
    return load_config(path=REPO / config, overrides=overrides), nproc


def _scratch(tmp_path: Path) -> Path:
    """A folder that looks like a clone to relative paths (launch/, checkpoints_tools/), where runs/ is the test's."""
    for name in ("launch", "checkpoints_tools"):
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    return tmp_path


def _run(command: str, *, cwd: Path, extra: Sequence[str] = (), timeout: int = 600) -> str:
    """``command`` as a shell runs it in ``cwd``, with ``extra`` overrides appended; torchrun on a free port (tests
    run side by side). Its output, or AssertionError with it when it fails."""
    command = command.replace("torchrun ", f"torchrun --master_port {free_port()} ", 1)
    line = " ".join([command, *map(shlex.quote, extra)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{line}\nfailed ({result.returncode}):\n{output[-8000:]}"
    return output


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_readme_shows_the_two_set_up_commands_and_the_walkthrough():
    set_up = readme_commands(SET_UP)
    assert set_up == ["pip install torch==2.13.0", "pip install -e .",
                      "torchrun --nproc_per_node 4 launch/pretrain_infifpo.py",
                      "pip install torch==2.13.0", 'pip install -e ".[test]"', "python -m pytest -q"]
    programs = [" ".join(_words(command)[:2]) for command in readme_commands(WALKTHROUGH)]
    assert programs == ["python -m", "python checkpoints_tools/hf_to_mcore.py", "python launch/score_sources.py",
                        "torchrun --nproc_per_node", "python checkpoints_tools/mcore_to_hf.py"]


def test_every_documented_training_command_fits_its_world_and_has_a_run_dir_of_its_own():
    commands = [command for section in (SET_UP, WALKTHROUGH) for command in readme_commands(section)
                if command.startswith("torchrun ")]
    run_dirs = []
    for command in commands:
        cfg, world_size = _trainer_config(command)
        validate_layout(cfg, world_size=world_size)
        run_dirs.append(cfg.run_dir)
    assert len(set(run_dirs)) == len(run_dirs) == 2, run_dirs
    # the walkthrough fine-tunes the converted pretrained pivot gently, with the paper's clipping
    walkthrough, _ = _trainer_config(commands[1])
    assert walkthrough.checkpoint.load and walkthrough.loss.clip and walkthrough.train.grad_clip > 0
    assert walkthrough.train.lr <= 5e-6


@pytest.mark.distributed
def test_the_default_job_runs_as_written(tmp_path):
    """Two steps and the held-out evaluation after them (rerunning continues a run: tests/reliability/test_resume.py)."""
    cwd = _scratch(tmp_path)
    output = _run(readme_commands(SET_UP)[2], cwd=cwd, extra=["train.steps=2", "train.warmup_steps=1",
                                                               "train.eval_interval=null"])
    assert "run summary" in output and "reference:       fused from 2 sources" in output
    rows = _metrics(cwd / "runs" / "tiny")
    assert [row["step"] for row in rows] == [1, 2] and "eval/loss" in rows[-1]
    assert (cwd / "runs" / "tiny" / "checkpoints" / "iter_0000002").is_dir()


@pytest.mark.slow
@pytest.mark.distributed
def test_fuse_your_own_models_runs_as_written_from_the_packaged_pivot(tmp_path):
    """Step by step, on the first 4 bundled pairs and one training step of 2 pairs."""
    cache = Path(os.environ.get("INFIFPO_MCORE_CACHE", "~/.cache/infifpo-mcore")).expanduser()
    if cache != Path("~/.cache/infifpo-mcore").expanduser():
        pytest.skip(f"INFIFPO_MCORE_CACHE={cache}: the README's commands name ~/.cache/infifpo-mcore")
    fetch, convert, score, train, export = readme_commands(WALKTHROUGH)
    cwd = _scratch(tmp_path)
    rows = (REPO / "launch" / "data" / "tiny_prefs_train.jsonl").read_text().splitlines(keepends=True)[:4]
    (cwd / "four_pairs.jsonl").write_text("".join(rows))
    _run(fetch, cwd=cwd)
    _run(convert, cwd=cwd)
    assert (cwd / "runs" / "smollm2-mcore" / "latest").exists()
    _run(score, cwd=cwd, extra=["data.path=four_pairs.jsonl"])
    scored = [json.loads(line) for line in (cwd / "runs" / "smollm2_two_sources" / "train_scored.jsonl").open()]
    assert len(scored) == 4 and all(len(row["fuse_chosen_logps"]) == 2 for row in scored)
    output = _run(train, cwd=cwd, extra=["train.steps=1", "train.warmup_steps=0", "train.global_batch_size=2",
                                         "train.micro_batch_size=1"])
    assert "loss.clip is on but the pivot started from a random init" not in output
    (step,) = _metrics(cwd / "runs" / "smollm2_two_sources")
    assert step["step"] == 1 and step["loss"] == step["loss"]  # trained, and not NaN
    _run(export, cwd=cwd)
    assert (cwd / "runs" / "smollm2-fused-hf" / "config.json").exists()
