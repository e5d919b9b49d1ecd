"""The CPU shim, exercised in a spawned process (it changes process-wide state)."""

import torch

from tests.distributed import run_distributed


def _cuda_requests_land_on_the_cpu(ctx):
    assert not torch.cuda.is_available()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64  # the converting form is untouched

    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    # Megatron's model-parallel RNG tracker forks the CPU generator and restores it afterwards.
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with get_cuda_rng_tracker().fork():
        assert not torch.equal(torch.rand(3), forked)  # the tracker's own stream advanced


def test_cpu_shim_redirects_cuda_requests_and_rng():
    run_distributed(_cuda_requests_land_on_the_cpu, world_size=1)
