"""Compatibility shims for running Megatron-Core where it has no official path (CPU + gloo)."""
