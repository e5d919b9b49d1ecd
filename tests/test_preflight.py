"""Issue #20, 3: what a run checks before it imports Megatron-Core or starts a process group. A config error needs
no torch at all, a data error no Megatron; every data problem comes in one report (tests/test_references.py); a
path that does not exist is said to not exist. (Under torchrun: tests/reliability/test_refusals.py.)"""

import json
import subprocess
import sys

import pytest

from infifpo_mcore.config import ConfigError
from infifpo_mcore.preflight import plan_run, read_inputs
from tests.launcher import REPO

TINY = str(REPO / "launch" / "configs" / "tiny_cpu.yaml")


def _imported_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_config_is_checked_without_importing_torch(tmp_path):
    modules = _imported_after(f"""
from infifpo_mcore.config import ConfigError
from infifpo_mcore.preflight import plan_run
try:
    plan_run(config={TINY!r}, overrides=["run_dir={tmp_path}", "loss.fusion=maxmargin"], fresh=False, world_size=4)
except ConfigError as error:
    assert "loss.fusion" in str(error)
else:
    raise AssertionError("not refused")
plan_run(config={TINY!r}, overrides=["run_dir={tmp_path}"], fresh=False, world_size=4)
""")
    assert "torch" not in modules and "megatron" not in modules


def test_the_data_is_checked_without_importing_megatron(tmp_path):
    modules = _imported_after(f"""
from infifpo_mcore.preflight import plan_run, read_inputs
inputs = read_inputs(plan_run(config={TINY!r}, overrides=["run_dir={tmp_path}"], fresh=False, world_size=4).cfg)
assert len(inputs.train) == 384 and len(inputs.eval) == 64
""")
    assert "megatron" not in modules and "torch" in modules


def test_the_layout_and_unsupported_options_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.virtual_pipeline \(2\) needs parallel.pipeline > 1, got 1"):
        plan_run(config=TINY, overrides=[f"run_dir={tmp_path}", "parallel.virtual_pipeline=2", "parallel.pipeline=1",
                                         "model.num_layers=4"], fresh=False, world_size=4)
    with pytest.raises(ConfigError, match=r"parallel.tensor \(2\) x parallel.pipeline \(2\) = 4 must divide the 2"):
        plan_run(config=TINY, overrides=[f"run_dir={tmp_path}"], fresh=False, world_size=2)


def test_a_checkpoint_that_does_not_exist_is_said_not_to_exist(tmp_path):
    with pytest.raises(ConfigError, match=rf"checkpoint.load: {tmp_path / 'nope'} does not exist"):
        plan_run(config=TINY, overrides=[f"run_dir={tmp_path}", f"checkpoint.load={tmp_path / 'nope'}"],
                 fresh=False, world_size=4)


def test_the_tokenizer_is_checked_with_the_data(tmp_path):
    cfg = plan_run(config=TINY, overrides=[f"run_dir={tmp_path}", "model.vocab_size=1000"], fresh=False,
                   world_size=4).cfg
    with pytest.raises(ConfigError, match=r"model.vocab_size \(1000\) is smaller than the tokenizer's vocabulary"):
        read_inputs(cfg)
    cfg = plan_run(config=TINY, overrides=[f"run_dir={tmp_path}", f"tokenizer.path={tmp_path / 'tok.model'}"],
                   fresh=False, world_size=4).cfg
    with pytest.raises(ConfigError, match=rf"tokenizer: tokenizer file not found: {tmp_path / 'tok.model'}"):
        read_inputs(cfg)
