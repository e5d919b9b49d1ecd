"""infifpo-mcore: InfiFPO preference-optimisation fusion of several LLMs into a Megatron-Core pivot."""

__version__ = "0.1.0"
