"""A run folder (``run_dir``) holds one run, so that rerunning the command that started it continues it.

    <run_dir>/config.yaml           the run's resolved config, written when training starts: its record
    <run_dir>/checkpoints/          its checkpoints (``checkpoint.save``; the shipped configs: ${run_dir}/checkpoints)
    <run_dir>/metrics.jsonl         one line per step; TensorBoard events in tensorboard/
    <run_dir>/skipped_steps.jsonl   and eval_rows/, skipped_rows.*.txt, wandb_run_id

Starting in a folder that holds a run (its config.yaml) continues that run from its newest complete checkpoint (the
``latest`` pointer in ``checkpoint.save``); what it logged after that step is dropped, so every step is logged once.
The config must be the recorded one except for keys that only say how long, how or where the run goes
(``RESUMABLE_CHANGES``: ``train.steps`` to extend it, the parallel layout, logging, evaluation and checkpoint
cadence); any other difference is refused, naming each key. ``--fresh`` replaces the run instead: its files and
the checkpoints in ``checkpoint.save`` are deleted first. A run without a checkpoint starts again from step 0.
``checkpoint.load`` is where a new run starts (another run's checkpoint, a converted model): a folder that holds
checkpoints resumes from its own.

Every rank plans the start alike from the same files (``plan_start``, read-only); rank 0 alone changes the folder
(``prepare_folder``), once every rank has planned.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infifpo_mcore.checkpoint_layout import ITERATION, LATEST, iteration_step, resolve_checkpoint
from infifpo_mcore.config import InfiFPOConfig, load_config, save_config, to_dict
from infifpo_mcore.refusals import Refusal

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SKIPPED_STEPS_FILE = "skipped_steps.jsonl"
EVAL_ROWS_DIR = "eval_rows"
WANDB_ID_FILE = "wandb_run_id"
# Everything a run writes in its folder besides its checkpoints: what --fresh deletes
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SKIPPED_STEPS_FILE, EVAL_ROWS_DIR, "tensorboard", WANDB_ID_FILE, "wandb",
             "skipped_rows.*.txt")
# Keys a resumed run may change: how long, how and where it runs, not what it trains (a prefix ending in "." covers
# a section). The layout may change because checkpoints load into any TP / PP / DP layout.
RESUMABLE_CHANGES = ("run_dir", "train.steps", "train.micro_batch_size", "train.eval_interval", "train.eval_on_start",
                     "train.recompute", "train.max_consecutive_bad_steps", "parallel.", "checkpoint.save_interval",
                     "checkpoint.keep_last", "logging.", "sources.output", "sources.chunk_rows",
                     "sources.batch_tokens", "sources.precision_check_rows", "sources.timeout_minutes")


class RunFolderError(Refusal, ValueError):
    label = "config error"


class RunFinished(Refusal):
    """Rerunning a finished run: nothing to train, which is not a failure."""

    label = "nothing to train"
    exit_code = 0


@dataclass(frozen=True)
class RunStart:
    """How a run starts in its folder."""

    run_dir: Path
    held_run: bool  # the folder holds a run's record (config.yaml)
    fresh: bool  # --fresh: whatever a run left in the folder and its checkpoint.save is deleted
    resume_from: Path | None = None  # the iteration directory of that run's newest complete checkpoint
    step: int = 0  # the step it continues after

    @property
    def keeps_through(self) -> int:
        """The last step whose logged lines stay (-1: none)."""
        return self.step if self.resume_from is not None else -1

    def describe(self, *, steps: int) -> str:
        """What the first lines of the run say about its folder."""
        where = f"run_dir {self.run_dir}"
        if self.fresh:
            return (f"{where}: --fresh: a new run from step 0, in place of what a run left there (its files and "
                    "the checkpoints in checkpoint.save are deleted)")
        if self.resume_from is not None:
            return (f"{where}: resuming its run from step {self.step} of {steps} ({self.resume_from}); "
                    "--fresh would start over")
        if self.held_run:
            return f"{where}: its run saved no checkpoint; starting it again from step 0"
        return f"{where}: a new run"


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_differences(recorded: InfiFPOConfig, cfg: InfiFPOConfig) -> list[str]:
    """``key: <recorded> there, <cfg> here`` for every key outside ``RESUMABLE_CHANGES`` whose value differs."""
    there, here = _flat(to_dict(recorded)), _flat(to_dict(cfg))
    return [f"{key}: {json.dumps(there.get(key))} there, {json.dumps(here.get(key))} here"
            for key in sorted(there.keys() | here.keys())
            if there.get(key) != here.get(key)
            and not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
                        for allowed in RESUMABLE_CHANGES)]


def plan_start(cfg: InfiFPOConfig, *, fresh: bool) -> RunStart:
    """Read-only, on every rank: a new run, the folder's run resumed or started again, or replaced (``fresh``).
    Raises RunFolderError when the folder holds a run of another config, or a finished one."""
    run_dir = Path(cfg.run_dir)
    record = run_dir / CONFIG_FILE
    held = record.is_file()
    if fresh:
        _check_fresh_keeps_the_start(cfg)
    if fresh or not held:
        return RunStart(run_dir=run_dir, held_run=held, fresh=fresh)
    differences = config_differences(load_config(path=record), cfg)
    if differences:
        raise RunFolderError(
            f"{run_dir} holds another run: its {CONFIG_FILE} differs from this config in\n  - "
            + "\n  - ".join(differences)
            + f"\nRerun that run's own command to continue it, choose another run_dir for a new run (e.g. "
              f"run_dir={run_dir}-2), or add --fresh to replace it (deleting its checkpoints and metrics).")
    root = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
    if root is None or not (root / LATEST).is_file():
        return RunStart(run_dir=run_dir, held_run=True, fresh=False)
    latest = resolve_checkpoint(root)
    step = iteration_step(latest)
    if step >= cfg.train.steps:
        raise RunFinished(
            f"the run in {run_dir} has finished: its checkpoint {latest} is at step {step} of train.steps="
            f"{cfg.train.steps}. To train it further, raise train.steps; to start it over, add --fresh; for a new "
            "run, choose another run_dir.")
    return RunStart(run_dir=run_dir, held_run=True, fresh=False, resume_from=latest, step=step)


def _check_fresh_keeps_the_start(cfg: InfiFPOConfig) -> None:
    """--fresh deletes the checkpoints in checkpoint.save: never the one the new run starts from."""
    save, load = cfg.checkpoint.save, cfg.checkpoint.load
    if save and load and Path(load).resolve().is_relative_to(Path(save).resolve()) and (Path(save) / LATEST).exists():
        raise RunFolderError(f"checkpoint.load={load} is inside checkpoint.save={save}, whose checkpoints --fresh "
                             "deletes; copy it elsewhere first, or start in another run_dir")


def prepare_folder(start: RunStart, cfg: InfiFPOConfig) -> None:
    """Rank 0, once every rank has planned: the folder as the run starts it. --fresh deletes the previous run; a
    new or restarted run drops what was logged, a resumed one what was logged after its checkpoint's step."""
    start.run_dir.mkdir(parents=True, exist_ok=True)
    if start.fresh:
        for pattern in RUN_FILES:
            for path in start.run_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if cfg.checkpoint.save and Path(cfg.checkpoint.save).is_dir():
            root = Path(cfg.checkpoint.save)
            for path in root.iterdir():
                if ITERATION.match(path.name) or path.name == LATEST:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    rewind(start.run_dir, keep_through=start.keeps_through)


def record_config(cfg: InfiFPOConfig) -> None:
    """Rank 0, when training starts (a run that fails while it builds leaves no record): the config, with what the
    trainer chose for it (``train.micro_batch_size: null``)."""
    save_config(cfg, path=Path(cfg.run_dir) / CONFIG_FILE)


def rewind(run_dir: Path, *, keep_through: int) -> None:
    """Drops what was logged for steps after ``keep_through`` (-1: everything): metrics, skipped steps, evaluation
    dumps; and the W&B run id when nothing is kept (a new W&B run then starts)."""
    for name in (METRICS_FILE, SKIPPED_STEPS_FILE):
        path = run_dir / name
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= keep_through]
            path.write_text("".join(kept), encoding="utf-8")
    for dump in sorted((run_dir / EVAL_ROWS_DIR).glob("step_*.jsonl")):
        if int(dump.stem.removeprefix("step_")) > keep_through:
            dump.unlink()
    if keep_through < 0:
        (run_dir / WANDB_ID_FILE).unlink(missing_ok=True)


def resume_command(argv: list[str], *, local_world_size: int, world_size: int) -> str:
    """The command that continues this run: the one that started it, without --fresh (torchrun's own options are
    not known to the workers: shown for a single node only)."""
    args = [arg for arg in argv[1:] if arg != "--fresh"]
    if local_world_size != world_size:
        return "the same command as this job's (same run_dir), without --fresh"
    return shlex.join(["torchrun", "--nproc_per_node", str(local_world_size), argv[0], *args])
