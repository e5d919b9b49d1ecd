"""Process layout: the job's split into training and source ranks, device/backend choice, Megatron ``parallel_state``.

A job of W ranks with ``sources.num_ranks = S`` runs the pivot on ranks [0, W - S) and the source models on
[W - S, W) (online mode; S = 0 is the offline mode). Each side gets its own default process group — Megatron-Core
initialises ``parallel_state`` over the training ranks only, as if the source ranks did not exist — and a *bridge*
(a gloo group over the whole job) carries the source scores to the last pipeline stage. The scores are a few numbers
per row, so the bridge is gloo on GPUs too: no NCCL communicator across the two sides, no GPU memory for it.

One ``ParallelContext`` is built at start and passed around (no module globals of ours). NCCL on GPUs, gloo on CPU;
without CUDA the Megatron-Core CPU shim (``compat.cpu``) is installed before Megatron touches a device. Every
process group of the package is set up here (the offline scorer's too: ``standalone_job``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from infifpo_mcore.compat import cpu as cpu_compat


@dataclass(frozen=True)
class JobLayout:
    """The whole job: ranks [0, training_ranks) train the pivot, [training_ranks, world_size) hold the sources."""

    rank: int
    world_size: int
    training_ranks: int
    device: torch.device
    backend: str
    bridge: dist.ProcessGroup | None  # gloo over every rank of the job; None in the offline mode

    @property
    def is_source_rank(self) -> bool:
        return self.rank >= self.training_ranks

    @property
    def source_leader(self) -> int:
        """The source rank that talks to the training ranks (the first one)."""
        return self.training_ranks


def local_device() -> torch.device:
    """This process's device: the GPU of its LOCAL_RANK (made current), or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def join_job(
    *, source_ranks: int = 0, timeout_minutes: int = 10, bridge_timeout: timedelta = timedelta(minutes=30)
) -> JobLayout:
    """Starts torch.distributed (env:// as torchrun sets it; a single process without torchrun) for this rank's side.

    Offline (``source_ranks`` 0) the default group is the whole job. Otherwise every rank rendezvouses once on the
    job's store and joins its side's default group and the bridge, each under its own store prefix. Collectives of
    the training side time out after ``timeout_minutes``; the bridge and the source side, which wait for the other
    side's progress (model loading, a checkpoint save), after ``bridge_timeout``.
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    device = local_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not source_ranks:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timeout)
        return JobLayout(rank=rank, world_size=world_size, training_ranks=world_size, device=device,
                         backend=backend, bridge=None)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=bridge_timeout))
    training_ranks = world_size - source_ranks
    bridge = dist.ProcessGroupGloo(dist.PrefixStore("bridge", store), rank, world_size, bridge_timeout)
    is_source = rank >= training_ranks
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore("sources" if is_source else "training", store),
        rank=rank - training_ranks if is_source else rank,
        world_size=source_ranks if is_source else training_ranks,
        timeout=bridge_timeout if is_source else timeout,
    )
    return JobLayout(rank=rank, world_size=world_size, training_ranks=training_ranks, device=device,
                     backend=backend, bridge=bridge)


@contextlib.contextmanager
def standalone_job(*, timeout: timedelta) -> Iterator[tuple[int, int]]:
    """(rank, world size) of a torchrun job whose ranks need only a default group of their own (the offline
    scorer: barriers, and a sharded source's forward): gloo for CPU tensors and, with GPUs, NCCL for CUDA ones. A
    plain process (no WORLD_SIZE, or 1) gets no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)
    try:
        yield dist.get_rank(), world
    finally:
        dist.destroy_process_group()


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
    job: JobLayout

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
    *, tensor: int, pipeline: int, seed: int, timeout_minutes: int = 10, job: JobLayout | None = None,
    virtual_pipeline: int | None = None,
) -> ParallelContext:
    """Megatron's groups over the training ranks (joining the job first unless ``job`` is given).

    The data-parallel size is what is left: training ranks / (tensor * pipeline). ``virtual_pipeline``: model chunks
    per pipeline rank (Megatron's interleaved schedule), or None.
    """
    if not torch.cuda.is_available():
        cpu_compat.apply()
    job = job or join_job(timeout_minutes=timeout_minutes)

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    world_size = dist.get_world_size()
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        device=job.device,
        backend=job.backend,
        tensor=tensor,
        pipeline=pipeline,
        data=world_size // (tensor * pipeline),
        job=job,
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
