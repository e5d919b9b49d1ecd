# Shared by infifpo.sbatch and score_sources.sbatch (sourced, not run): settings read from the environment, the
# torch/NCCL environment, and `launch ENTRY ARGS...`, which starts one torchrun per node with srun and prints the
# resolved command first. The caller sets REPO_DIR and cds there before sourcing this file.
#
# Every setting is `${VAR:-default}`: set it in the environment, with `sbatch --export=ALL,VAR=value`, or edit here.
#   GPUS_PER_NODE    ranks per node (default: the GPUs Slurm gave the node, else 8)
#   NNODES           nodes (default: the job's node count)
#   CPUS_PER_NODE    CPUs handed to the one srun task per node (default: the job's CPUs on the node)
#   MASTER_PORT      TCP port of the c10d rendezvous on the first node (default 29500)
#   LOG_DIR          per-rank stdout/stderr files from torchrun, under LOG_DIR/<job id>/ (default runs/logs)
#   CONTAINER_IMAGE  run inside this image with pyxis/enroot (srun --container-image); empty: no container
#   CONTAINER_MOUNTS pyxis mounts, src:dst[,src:dst] (default: the repository at the same path)
#   VENV             a Python virtual environment to activate first; empty: use what is on PATH
#   OVERRIDES        space-separated dotted config overrides, e.g. "train.steps=10 loss.beta=0.2" (values with spaces:
#                    pass them as arguments after the script name instead)

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
CPUS_PER_NODE=${CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-}}
MASTER_PORT=${MASTER_PORT:-29500}
LOG_DIR=${LOG_DIR:-runs/logs}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}
VENV=${VENV:-}
OVERRIDES=${OVERRIDES:-}

# CPU threads per rank: the GPUs do the math, so the node's CPUs shared among its ranks (torchrun would otherwise
# force 1 and warn).
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$(( ${CPUS_PER_NODE:-$GPUS_PER_NODE} / GPUS_PER_NODE ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
# A failed or timed-out collective tears the ranks down, so the job ends instead of holding every GPU hung until
# the time limit (3: without aborting the communicator first, which can itself hang; torch's default, set here
# for older images).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
# Stop signals. Slurm signals every process of the job step: torchrun (whose default action for SIGUSR1 would be
# to die on the spot) and its workers. torchrun passes the signals listed here on to its workers and waits up to
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for them: the trainer finishes its step, saves a checkpoint and returns
# (infifpo_mcore/preemption.py). PET_* is what torchrun's --signals-to-handle reads; the TORCHELASTIC_* name is
# the one older torchrun versions read. Keep sbatch's --signal lead time above the shutdown timeout, and the
# timeout above one step plus one checkpoint save.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-$PET_SIGNALS_TO_HANDLE}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}
# Megatron's tensor-parallel layers overlap their gradient all-reduce with compute only when kernels are issued in
# order on one hardware queue (it warns without this).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# NCCL prints its warnings (topology, transport fallbacks); INFO to debug a slow or failing network.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Python output reaches the log as it happens, not in 4 KiB blocks.
export PYTHONUNBUFFERED=1

# OVERRIDES as words, for the scripts to place after their own arguments (later overrides win).
read -r -a OVERRIDE_ARGS <<< "$OVERRIDES"

die() { echo "error: $*" >&2; exit 2; }

launch() {
    local entry=$1
    shift
    [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] || die "not inside a Slurm job: submit with sbatch"
    [[ -f $entry ]] || die "entry point $entry not found under $PWD (set REPO_DIR to the repository)"
    if [[ -n $VENV ]]; then
        [[ -f $VENV/bin/activate ]] || die "VENV=$VENV has no bin/activate"
        # Here in the batch shell: srun passes the environment (PATH, VIRTUAL_ENV) on to every node's task.
        set +u  # some activate scripts read unset variables
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
        set -u
    fi
    # The first node hosts the rendezvous. `sed -n 1p` rather than `head -1`: head may exit before scontrol has
    # written everything, and the SIGPIPE would fail the script under pipefail.
    local head_node
    head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
    [[ -n $head_node ]] || die "no host names in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    mkdir -p "$LOG_DIR/$SLURM_JOB_ID"

    # One task per node; torchrun starts that node's GPUS_PER_NODE ranks. The task needs all the node's CPUs
    # (srun does not inherit sbatch's --cpus-per-task since Slurm 22.05); a dead node ends the whole step.
    local srun_cmd=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
    if [[ -n $CPUS_PER_NODE ]]; then
        srun_cmd+=(--cpus-per-task="$CPUS_PER_NODE")
    fi
    if [[ -n $CONTAINER_IMAGE ]]; then
        srun_cmd+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS"
                   --container-workdir="$REPO_DIR")
    fi
    # --rdzv_id: the job id, the same on every node and new for every job, so a resubmitted job never joins an
    # old rendezvous. --tee 3: every rank's stdout and stderr to the job log and to files under LOG_DIR.
    local torchrun_cmd=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
                        --rdzv_backend c10d --rdzv_endpoint "$head_node:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID"
                        --log_dir "$LOG_DIR/$SLURM_JOB_ID" --tee 3
                        "$entry" "$@")

    echo "job $SLURM_JOB_ID: $NNODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous $head_node:$MASTER_PORT," \
         "OMP_NUM_THREADS=$OMP_NUM_THREADS${CONTAINER_IMAGE:+, container $CONTAINER_IMAGE}"
    local resolved
    resolved=$(printf '%q ' "${srun_cmd[@]}" "${torchrun_cmd[@]}")
    echo "launch: ${resolved% }"
    "${srun_cmd[@]}" "${torchrun_cmd[@]}"
}
