"""The CPU shim, exercised in a spawned process (it changes process-wide state)."""

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.newest_mcore  # the shim patches names of a release: checked on the newest one too


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


def test_a_patch_target_missing_from_the_installed_release_stops_with_its_name():
    """The shims patch private Megatron names; one a release renamed must fail at once, naming the symbol."""
    import types

    from megatron.core.optimizer import distrib_optimizer

    from infifpo_mcore.compat.patching import MissingPatchTarget, megatron_core_version, target

    assert target(distrib_optimizer.DistributedOptimizer, "state_dict", why="test") is \
        distrib_optimizer.DistributedOptimizer.state_dict
    with pytest.raises(MissingPatchTarget) as caught:
        target(distrib_optimizer.DistributedOptimizer, "_renamed_in_a_later_release", why="KeyError 'step' on load")
    message = str(caught.value)
    assert (f"megatron-core {megatron_core_version()} has no megatron.core.optimizer.distrib_optimizer."
            "DistributedOptimizer._renamed_in_a_later_release" in message)
    assert "(KeyError 'step' on load)" in message
    with pytest.raises(MissingPatchTarget, match=r"has no megatron.core.tensor_parallel.random._gone, "):
        target(types.ModuleType("megatron.core.tensor_parallel.random"), "_gone", why="test")
