"""Process layout: torch.distributed init, device/backend choice and Megatron-Core ``parallel_state``.

One ``ParallelContext`` is built at start and passed around (no module globals of ours). NCCL on GPUs, gloo on CPU;
without CUDA the Megatron-Core CPU shim (``compat.cpu``) is installed before Megatron touches a device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from infifpo_mcore.compat import cpu as cpu_compat


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits. Sizes are fixed for the run; stage predicates come from Megatron's state."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    tensor: int
    pipeline: int
    data: int

    @property
    def is_first_stage(self) -> bool:
        from megatron.core import parallel_state

        return parallel_state.is_pipeline_first_stage(ignore_virtual=True)

    @property
    def is_last_stage(self) -> bool:
        from megatron.core import parallel_state

        return parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    @property
    def data_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    @property
    def is_logging_rank(self) -> bool:
        """Global rank 0 prints and writes metrics; metrics are sent to it from the last stage."""
        return self.rank == 0


def init_parallel(
    *, tensor: int, pipeline: int, seed: int, timeout_minutes: int = 10
) -> ParallelContext:
    """Starts torch.distributed (env:// as torchrun sets it; a single process without torchrun) and Megatron's groups.

    The data-parallel size is what is left: world_size / (tensor * pipeline).
    """
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_compat.apply()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    world_size = dist.get_world_size()
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        device=device,
        backend=backend,
        tensor=tensor,
        pipeline=pipeline,
        data=world_size // (tensor * pipeline),
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
