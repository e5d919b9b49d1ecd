"""Run a test function on several gloo processes of this machine (Megatron parallel state initialised)."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, fn, world_size: int, port: int, tensor: int, pipeline: int, timeout_minutes: float, errors,
            kwargs) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    from infifpo_mcore.parallel import destroy_parallel, init_parallel

    try:
        ctx = init_parallel(tensor=tensor, pipeline=pipeline, seed=1234, timeout_minutes=timeout_minutes)
        fn(ctx, **kwargs)
    except BaseException:  # reported to the parent, which fails the test with the worker's traceback
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        destroy_parallel()


def run_distributed(fn, *, world_size: int, tensor: int = 1, pipeline: int = 1, timeout_minutes: float = 10,
                    **kwargs) -> None:
    """``fn(ctx, **kwargs)`` on every rank; raises with the first worker traceback if any rank fails. Collectives
    time out after ``timeout_minutes``."""
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    try:
        mp.start_processes(
            _worker, args=(fn, world_size, free_port(), tensor, pipeline, timeout_minutes, errors, kwargs),
            nprocs=world_size,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as error:
        raise AssertionError(errors.get() if not errors.empty() else str(error)) from None
