"""Fusion methods behind one registry: classical rules, learned networks, published outputs."""

from medfuse.methods.registry import build_method, method_names

__all__ = ["build_method", "method_names"]
