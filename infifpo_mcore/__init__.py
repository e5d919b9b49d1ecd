"""infifpo-mcore: InfiFPO preference-optimisation fusion of several LLMs into a Megatron-Core pivot."""

from infifpo_mcore.compat import triton_free

__version__ = "0.1.0"

triton_free.install()  # before anything imports megatron.core (it needs Triton from 0.19 on, see the module)
