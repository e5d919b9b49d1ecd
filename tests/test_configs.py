"""Every shipped config loads and fits the world size its first line names (`# world_size: N`); the paper's layout
fits an 80 GiB H100 by the memory estimate its comments quote."""

import re
from pathlib import Path

import pytest

from infifpo_mcore.config import load_config, validate_layout
from infifpo_mcore.memory import GIB, estimate_memory_per_rank, stage_parameters

CONFIG_DIR = Path(__file__).resolve().parents[1] / "launch" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
PAPER = CONFIG_DIR / "paper_phi4_8x8.yaml"


def intended_world_size(path: Path) -> int:
    match = re.match(r"# world_size: (\d+)\n", path.read_text(encoding="utf-8"))
    assert match, f"{path.name}: the first line must be '# world_size: N', the ranks the config is laid out for"
    return int(match.group(1))


def test_the_configs_are_found():
    assert {"tiny_cpu.yaml", "paper_phi4_8x8.yaml"} <= {path.name for path in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_loads_and_fits_its_world_size(path):
    validate_layout(load_config(path=path), world_size=intended_world_size(path))


def _paper_estimate(**changes):
    cfg = load_config(path=PAPER)
    world = intended_world_size(PAPER)
    layout = dict(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                  data=validate_layout(cfg, world_size=world)) | changes
    return estimate_memory_per_rank(
        model=cfg.model, **layout, micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.model.seq_length,
        precision=cfg.train.precision, distributed_optimizer=True, vocab_size=cfg.model.vocab_size)


def test_paper_layout_fits_an_80_gib_h100():
    estimate = _paper_estimate()
    assert (estimate.tensor, estimate.pipeline, estimate.data) == (2, 4, 8)
    assert estimate.total_bytes < 80 * GIB
    # the numbers the config's comment quotes
    assert round(estimate.total_bytes / GIB, 1) == 46.5
    assert round(_paper_estimate(pipeline=2, data=16).total_bytes / GIB, 1) == 55.9
    assert _paper_estimate(pipeline=1, data=32).total_bytes > 77 * GIB  # TP 2 alone: no room left


def test_paper_pivot_has_phi4_size():
    cfg = load_config(path=PAPER)
    parameters = stage_parameters(model=cfg.model, vocab_size=cfg.model.vocab_size, tensor=1, pipeline=1, stage=0)
    assert parameters == 14_659_507_200  # Phi-4's 14.7B
    assert [source.precision for source in cfg.sources.models] == ["fp8"] * 5
