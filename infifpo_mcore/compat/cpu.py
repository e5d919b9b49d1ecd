"""Run Megatron-Core on a CPU-only machine (gloo, fp32) — applied only when CUDA is absent.

Megatron-Core places tensors with ``device="cuda"`` / ``torch.cuda.current_device()`` in many spots of the training path
(causal mask in ``transformer/utils.py``, rope ``inv_freq``, the global memory buffer in ``utils.py``,
``total_num_tokens`` in ``pipeline_parallel/schedules.py``, p2p receive buffers in ``p2p_communication.py``, DDP
``grad_data`` in ``param_and_grad_buffer.py``, ``clip_grads.py``, ``optimizer.py``) and talks to the CUDA runtime
(RNG tracker in ``tensor_parallel/random.py``, streams, ``synchronize``). Rather than re-implementing each of those
functions, two mechanisms cover all of them without touching Megatron's code:

1. ``_CudaToCpu``, a ``TorchFunctionMode``: every torch call that asks for a CUDA device (factory ``device=``
   arguments, ``Tensor.cuda()``, ``Tensor.to("cuda")``) gets the CPU instead, and ``Tensor.type()`` names CPU
   tensors as their CUDA twins for Megatron's type asserts.
2. ``torch.cuda`` runtime entry points Megatron calls are given CPU meanings: ``current_device`` -> 0 (then mapped to
   CPU by 1.), RNG state get/set/seed -> the CPU generator, ``synchronize`` / streams -> no-ops.
3. The autograd engine runs backward functions without the mode of 1.; Megatron's activation recomputation
   (``tensor_parallel.random.CheckpointFunction``, ``train.recompute``) re-runs forward code there (the causal mask
   again), so its backward re-enters the mode.

Nothing here runs when ``torch.cuda.is_available()``; a GPU process never sees these patches. The Megatron names
patched are private: a release without one stops ``apply`` with ``MissingPatchTarget`` naming it (``patching``).
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from infifpo_mcore.compat.patching import target

_CPU = torch.device("cpu")
_applied = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int index) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placement requests to the CPU (see module docstring, mechanism 1)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads.py asserts `grad.type() == 'torch.cuda.FloatTensor'`: the CPU stands in for the device.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and args[1:] and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for a CUDA stream/event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _cpu_rng_get(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def apply() -> None:
    """Installs the shim once per process; a no-op when CUDA is available."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    # Mechanism 2: the torch.cuda runtime calls Megatron makes on the training path.
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_rng_state = _cpu_rng_get
    torch.cuda.set_rng_state = _cpu_rng_set
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NoStream()
    torch.cuda.default_stream = lambda device=None: _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()

    # tensor_parallel/random.py keeps its own CUDA RNG helpers (CudaRNGStatesTracker.fork calls them by name).
    from megatron.core.tensor_parallel import random as mcore_random

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        target(mcore_random, name, why="the model-parallel RNG tracker's CUDA generator calls")
    mcore_random._get_cuda_rng_state = _cpu_rng_get
    mcore_random._set_cuda_rng_state = _cpu_rng_set

    # Mechanism 3: the recomputation in the backward pass.
    checkpoint_function = target(mcore_random, "CheckpointFunction", why="activation recomputation on the CPU")
    recompute_backward = target(checkpoint_function, "backward", why="activation recomputation on the CPU")

    def recompute_backward_on_cpu(ctx, *grads):
        with _CudaToCpu():
            return recompute_backward(ctx, *grads)

    mcore_random.CheckpointFunction.backward = staticmethod(recompute_backward_on_cpu)

    _CudaToCpu().__enter__()  # Mechanism 1, for the life of the process.
    _applied = True
