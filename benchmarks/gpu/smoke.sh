#!/usr/bin/env bash
# The GPU smoke kit, one command (benchmarks/gpu/README.md):
#
#   on the borrowed GPU:  bash benchmarks/gpu/smoke.sh                  (the device tool's run, carry [".gpu/smoke"])
#   rehearsal on CPU:     bash benchmarks/gpu/smoke.sh --dry-run --out runs/smoke
#
# GPU: checks and installs the wheels benchmarks/gpu/prepare.sh put in .gpu/smoke (megatron-core, trl, ... for the
# image's Python 3.12; --no-index --no-deps into /tmp/smoke-site), then runs benchmarks/smoke.py: the trainer with
# NCCL and bf16 on a ~1B Llama shape, pivot_step (MFU), vs_trl and source_scoring, within --budget-seconds (480),
# JSON to --out (default $OUT, the folder the device tool brings back).
# --dry-run: the same steps on CPU (gloo, tiny shape, fp32) with this environment's packages (the carried wheels are
# for Python 3.12; their checksums are still checked when the folder exists). Any other option goes to
# benchmarks/smoke.py (e.g. --budget-seconds 900).
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=.gpu/smoke
SITE=/tmp/smoke-site
dry_run=false
out=${OUT:-}
args=()
while (($#)); do
    case "$1" in
    --dry-run) dry_run=true ;;
    --out) out=$2; shift ;;
    *) args+=("$1") ;;
    esac
    shift
done
if [[ -z "$out" ]]; then echo "no --out and no \$OUT: where should the results go?" >&2; exit 2; fi
python=$(command -v python3 || command -v python)

if [[ -d $KIT ]]; then
    (cd $KIT && sha256sum --quiet -c SHA256SUMS)
fi
if $dry_run; then
    echo "dry run: CPU, this environment's packages ($("$python" --version))"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    exec "$python" -m benchmarks.smoke --dry-run --out "$out" "${args[@]}"
fi

if [[ ! -f $KIT/SHA256SUMS ]]; then
    echo "$KIT is missing: run 'bash benchmarks/gpu/prepare.sh' where there is a registry, then carry $KIT" >&2
    exit 2
fi
started=$(date +%s)
"$python" -m pip install -q --no-index --no-deps --no-compile --target $SITE $KIT/*.whl
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$python" - <<'PY'
import torch, megatron.core, trl, transformers
print(f"installed: torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core {megatron.core.__version__}, "
      f"trl {trl.__version__}, transformers {transformers.__version__};",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE", flush=True)
PY
echo "install: $(($(date +%s) - started)) s"
exec "$python" -m benchmarks.smoke --out "$out" "${args[@]}"
