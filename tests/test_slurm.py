"""The Slurm batch scripts, run as Slurm would run them on a 2-node job, with fake `srun` and `scontrol` first on
PATH: the fakes record what they were given instead of launching anything, so no Slurm is needed."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODELIST = "gpu-node[07-08]"
HOSTS = ["gpu-node07", "gpu-node08"]
JOB_ID = "4242"

FAKE_SRUN = """#!/bin/bash
# Records its arguments (NUL-separated) and environment instead of launching the job step.
printf '%s\\0' "$@" > "$FAKE_RECORD/srun.argv"
env -0 > "$FAKE_RECORD/srun.env"
pwd > "$FAKE_RECORD/srun.cwd"
"""
FAKE_SCONTROL = f"""#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_RECORD/scontrol.argv"
[[ "$1 $2" == "show hostnames" ]] || exit 1
printf '%s\\n' {' '.join(HOSTS)}
"""


def _run(script: str, tmp_path: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
    """`bash script args` from a directory other than the repository, in a Slurm-like environment with only
    `env` added (nothing leaks in from the test's own environment). Returns (stdout, srun argv, srun env)."""
    fake_bin, record = tmp_path / "bin", tmp_path / "record"
    fake_bin.mkdir()
    record.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}.items():
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    slurm = {
        "PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_RECORD": str(record),
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOBID": JOB_ID, "SLURM_JOB_NAME": Path(script).stem,
        "SLURM_JOB_NODELIST": NODELIST, "SLURM_NODELIST": NODELIST, "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64", "SLURM_SUBMIT_DIR": str(REPO),
        "LOG_DIR": str(tmp_path / "logs"), **(env or {}),
    }
    result = subprocess.run(["bash", str(REPO / script), *args], cwd=tmp_path, env=slurm, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (record / "scontrol.argv").read_text().split("\0")[:-1] == ["show", "hostnames", NODELIST]
    argv = (record / "srun.argv").read_text().split("\0")[:-1]
    srun_env = dict(line.split("=", 1) for line in (record / "srun.env").read_text().split("\0") if "=" in line)
    srun_env["cwd"] = (record / "srun.cwd").read_text().strip()
    return result.stdout, ["srun", *argv], srun_env


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _check_launch(stdout: str, argv: list[str], env: dict[str, str], *, gpus: int, entry: str,
                  port: int = 29500) -> list[str]:
    """Checks what every job step must look like; returns the arguments after the entry point."""
    printed = [line.removeprefix("launch: ") for line in stdout.splitlines() if line.startswith("launch: ")]
    assert len(printed) == 1 and shlex.split(printed[0]) == argv  # the printed command is the one run
    torchrun = argv.index("torchrun")
    srun, command = argv[:torchrun], argv[torchrun:]
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=64"} <= set(srun)
    assert _option(command, "--nnodes") == "2"
    assert _option(command, "--nproc_per_node") == str(gpus)
    assert _option(command, "--rdzv_backend") == "c10d"
    assert _option(command, "--rdzv_endpoint") == f"{HOSTS[0]}:{port}"
    assert _option(command, "--rdzv_id") == JOB_ID
    assert env["OMP_NUM_THREADS"] == str(64 // gpus)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["cwd"] == str(REPO)  # the step runs in the repository, wherever sbatch was called from
    return command[command.index(entry) + 1:]


def test_training_job_on_two_nodes(tmp_path):
    run_dir = tmp_path / "run"
    stdout, argv, env = _run("launch/slurm/infifpo.sbatch", tmp_path, env={"RUN_DIR": str(run_dir)})
    args = _check_launch(stdout, argv, env, gpus=8, entry="launch/pretrain_infifpo.py")
    assert args == ["--config", "launch/configs/paper_phi4_8x8.yaml", f"run_dir={run_dir}",
                    f"checkpoint.save={run_dir}/checkpoints"]
    assert not any(arg.startswith("--container") for arg in argv)
    assert (tmp_path / "logs" / JOB_ID).is_dir()
    assert _option(argv, "--log_dir") == f"{tmp_path}/logs/{JOB_ID}"


def test_training_job_with_exported_settings_is_the_same_command_when_it_resumes(tmp_path):
    """Issue #20: resubmitting continues the run because the trainer resumes a run folder by itself; the script
    no longer adds checkpoint.load (which would now be a change of the run's config)."""
    run_dir = tmp_path / "run"
    exported = {"GPUS_PER_NODE": "4", "CONFIG": "launch/configs/tiny_cpu.yaml", "RUN_DIR": str(run_dir),
                "OVERRIDES": "train.steps=5 loss.beta=0.2", "MASTER_PORT": "29600",
                "CONTAINER_IMAGE": "nvcr.io/nvidia/pytorch:25.01-py3"}
    commands = []
    for job in ("first", "resubmitted"):
        (tmp_path / job).mkdir()
        stdout, argv, env = _run("launch/slurm/infifpo.sbatch", tmp_path / job, env=exported,
                                 args=("loss.type=dpo",))
        commands.append(_check_launch(stdout, argv, env, gpus=4, entry="launch/pretrain_infifpo.py", port=29600))
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "latest").write_text("iter_0000100")
    assert commands[0] == commands[1] == [
        "--config", "launch/configs/tiny_cpu.yaml", f"run_dir={run_dir}", f"checkpoint.save={run_dir}/checkpoints",
        "train.steps=5", "loss.beta=0.2", "loss.type=dpo"]
    assert {"--container-image=nvcr.io/nvidia/pytorch:25.01-py3", f"--container-mounts={REPO}:{REPO}",
            f"--container-workdir={REPO}"} <= set(argv[:argv.index("torchrun")])


def test_training_job_keeps_the_configs_run_dir_when_run_dir_is_empty(tmp_path):
    stdout, argv, env = _run("launch/slurm/infifpo.sbatch", tmp_path, env={"RUN_DIR": ""})
    args = _check_launch(stdout, argv, env, gpus=8, entry="launch/pretrain_infifpo.py")
    assert args == ["--config", "launch/configs/paper_phi4_8x8.yaml"]


def test_scoring_job_on_two_nodes_in_a_virtual_environment(tmp_path):
    out, venv = tmp_path / "scored.jsonl", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV={venv}\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n')
    stdout, argv, env = _run("launch/slurm/score_sources.sbatch", tmp_path,
                             env={"OUT": str(out), "OVERRIDES": "sources.chunk_rows=32", "VENV": str(venv)},
                             args=("data.path=/data/train.jsonl",))
    args = _check_launch(stdout, argv, env, gpus=8, entry="launch/score_sources.py")
    assert args == ["--config", "launch/configs/paper_phi4_8x8.yaml", "--out", str(out), "sources.chunk_rows=32",
                    "data.path=/data/train.jsonl"]
    assert env["VIRTUAL_ENV"] == str(venv) and env["PATH"].startswith(f"{venv}/bin:")  # what srun hands the nodes


@pytest.mark.parametrize("script", ["launch/slurm/infifpo.sbatch", "launch/slurm/score_sources.sbatch"])
def test_a_missing_config_stops_before_srun(tmp_path, script):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": NODELIST,
           "SLURM_SUBMIT_DIR": str(REPO), "CONFIG": "launch/configs/nope.yaml", "LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run(["bash", str(REPO / script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "CONFIG=launch/configs/nope.yaml not found" in result.stderr


def test_training_job_routes_the_wall_time_signal_to_the_workers(tmp_path):
    """Slurm sends USR1 ahead of the time limit to every process of the step; torchrun must pass it on (not die of
    it) and give the workers longer than the step plus a save, but less than the lead time."""
    _, _, env = _run("launch/slurm/infifpo.sbatch", tmp_path, env={"RUN_DIR": str(tmp_path / "run")})
    assert "SIGUSR1" in env["PET_SIGNALS_TO_HANDLE"].split(",") and "SIGTERM" in env["PET_SIGNALS_TO_HANDLE"]
    assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == env["PET_SIGNALS_TO_HANDLE"]
    lead = re.search(r"^#SBATCH --signal=USR1@(\d+)$", (REPO / "launch/slurm/infifpo.sbatch").read_text(), re.M)
    assert lead and int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < int(lead.group(1))
