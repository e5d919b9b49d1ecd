#!/usr/bin/env bash
# Run ON THE GPU MACHINE (the device tool's `run`), in the repository root, after benchmarks/gpu/prepare.sh ran here
# and every .gpu/te/part-* arrived over consecutive calls (see benchmarks/gpu/README.md). UNTESTED on a GPU so far.
#   bash benchmarks/gpu/device_setup.sh parts     # lists what has arrived (the calls that only carry a part)
#   bash benchmarks/gpu/device_setup.sh install   # joins the TE core, installs everything to /tmp/site, builds
#                                                 # transformer-engine-torch against the image's torch, verifies
#   bash benchmarks/gpu/device_setup.sh verify    # imports + one FP8 te.Linear forward on the GPU
# Later calls on the same warm machine: export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
SITE=/tmp/site
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
PIP=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE)

verify() {
    python3 - <<'PY'
import torch, megatron.core, transformer_engine.pytorch as te, trl
from transformer_engine.common.recipe import DelayedScaling
print("torch", torch.__version__, "| megatron-core", megatron.core.__version__, "| trl", trl.__version__,
      "| TE", getattr(__import__("transformer_engine"), "__version__", "?"), "|", torch.cuda.get_device_name())
layer = te.Linear(256, 256, params_dtype=torch.bfloat16, device="cuda")
x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
with torch.no_grad(), te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling()):
    y = layer(x)
reference = x @ layer.weight.t()
error = ((y.float() - reference.float()).abs().mean() / reference.float().abs().mean()).item()
print(f"FP8 te.Linear forward OK: {tuple(y.shape)}, mean relative error vs bf16 {error:.4f}")
assert error < 0.1, error
PY
}

case "${1:-}" in
parts)
    ls -l .gpu/te/ ;;
install)
    cd .gpu/te && cat part-* > "$(cut -d' ' -f3 core.sha256)" && sha256sum -c core.sha256 && cd ../..
    "${PIP[@]}" .gpu/wheels/*.whl .gpu/te/transformer_engine_cu13-*.whl
    # transformer-engine-torch is source-only: build it against the image's torch 2.11+cu130 (no build isolation,
    # so the build sees that torch and the TE core just installed); nvcc, ninja and pybind11 are on the image.
    NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-index --no-deps \
        --no-build-isolation --no-cache-dir --target $SITE .gpu/wheels/transformer_engine_torch-*.tar.gz
    verify ;;
verify)
    verify ;;
*)
    echo "usage: $0 parts|install|verify" >&2; exit 2 ;;
esac
