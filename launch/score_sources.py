"""Score a preference dataset with every configured source model (offline InfiFPO), writing the dataset the trainer
reads: the input rows plus per-source fuse_* log-prob lists (infifpo_mcore/sources.py has the details).

One process, or several with torchrun (rows are spread over the ranks; gloo on CPU)::

    python launch/score_sources.py --config my_sources.yaml --out runs/scored/train.jsonl
    torchrun --nproc_per_node 4 launch/score_sources.py --config my_sources.yaml data.path=prefs.jsonl

An interrupted run resumes from ``<out>.cache/`` when started again with the same sources; then train on ``<out>``::

    torchrun --nproc_per_node 4 launch/pretrain_infifpo.py data.path=runs/scored/train.jsonl loss.type=infifpo
"""

import argparse
import logging
import os
import sys

from infifpo_mcore.config import ConfigError, load_config
from infifpo_mcore.data import DataError
from infifpo_mcore.sources import SourceError, score_sources


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with sources.models and data.path")
    parser.add_argument("--out", help="where to write the scored dataset (default: sources.output)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=prefs.jsonl")
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        score_sources(load_config(path=args.config, overrides=args.overrides), out=args.out)
    except (ConfigError, DataError, SourceError) as error:
        # Config and data problems are found by every rank alike: say them once. A source problem may be one rank's.
        if rank == 0 or isinstance(error, SourceError):
            print(f"{f'[rank {rank}] ' if world > 1 else ''}error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
