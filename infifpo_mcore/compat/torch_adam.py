"""Megatron-Core's distributed optimizer on torch's Adam — its fallback without Transformer Engine or Apex (CPU, and
GPU images without TE) — checkpointed and resumed exactly. Applied only where that fallback is in use.

Cause (megatron-core 0.16.1 to 0.19.2, ``optimizer/distrib_optimizer.py``, the ``HAVE_APEX_OR_TE`` false branches):
TE's and Apex's FusedAdam count steps per parameter group; torch's Adam counts them per parameter, in each
parameter's state (``state[p]["step"]``, a tensor it increments in place). ``DistributedOptimizer`` moves that count
into the param groups for a checkpoint and back on load, but three places miss it:

1. ``_set_main_param_and_optimizer_states`` copies *every* key of the destination state from the loaded tensors.
   Every loader (``load_parameter_state_from_fully_reshardable`` etc.) drops ``"step"`` from them — the count comes
   from the param groups — so the destination's ``"step"`` finds no source: **KeyError 'step'** on every load.
2. ``state_dict`` takes the count from the per-parameter states and asserts there is exactly one; an optimizer that
   has not stepped yet (a load into a new run, a save before the first good step) has none: AssertionError.
3. ``load_state_dict`` puts *one* step tensor into every parameter's state; torch's Adam then increments it once per
   parameter per step, and the bias correction of a resumed run is wrong from its first step.

Fixes, each the smallest wrap of the method at fault: the loaded tensors get the destination's own step (1), the
optimizer state is created as torch's Adam creates it on its first step (zeros, step 0) before ``state_dict``
reads it (2), and each parameter gets its own copy of the loaded step (3). Tested: DP 2 save -> resume is bit-exact
with the uninterrupted run, and checkpoints reshard DP 2 <-> DP 1 (tests/test_trainer.py).
"""

from __future__ import annotations

import functools

import torch

from infifpo_mcore.compat.patching import target

_applied = False


def _adam_states(optimizer):
    """(parameter, its torch Adam state) of every main parameter the distributed optimizer steps."""
    for group in optimizer.optimizer.param_groups:
        for param in group["params"]:
            yield param, optimizer.optimizer.state[param]


def _create_missing_states(optimizer) -> None:
    """What torch's Adam creates for a parameter on its first step (``Adam._init_group``), created now."""
    for param, state in _adam_states(optimizer):
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def apply() -> None:
    """Installs the three fixes once per process; a no-op where TE's or Apex's FusedAdam is in use."""
    global _applied
    from megatron.core.optimizer import distrib_optimizer

    if _applied or target(distrib_optimizer, "HAVE_APEX_OR_TE", why="which Adam the optimizer uses"):
        return
    optimizer_class = distrib_optimizer.DistributedOptimizer
    set_states = target(optimizer_class, "_set_main_param_and_optimizer_states", why="KeyError 'step' on load")
    state_dict = target(optimizer_class, "state_dict", why="a state dict before the first step")
    load_state_dict = target(optimizer_class, "load_state_dict", why="one step tensor shared by all parameters")

    @functools.wraps(set_states)
    def set_states_keeping_step(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            tensors = tensors if step is None else {**tensors, "step": step}
        return set_states(self, model_param, tensors)

    @functools.wraps(state_dict)
    def state_dict_with_states(self):
        _create_missing_states(self)
        return state_dict(self)

    @functools.wraps(load_state_dict)
    def load_state_dict_with_own_steps(self, state):
        load_state_dict(self, state)
        for _, adam_state in _adam_states(self):
            if "step" in adam_state:
                adam_state["step"] = adam_state["step"].clone()

    optimizer_class._set_main_param_and_optimizer_states = set_states_keeping_step
    optimizer_class.state_dict = state_dict_with_states
    optimizer_class.load_state_dict = load_state_dict_with_own_steps
    _applied = True
