"""Deprecated name of :mod:`diffnas_jax.mixing` (architecture logits -> mixing weights; renamed so that it is not confused with diffnas_jax.relax, the array-level relaxed operators); kept for one release.

Attribute access forwards to :mod:`diffnas_jax.mixing` with a ``DeprecationWarning``.
"""
from diffnas_jax._deprecated import forward_module

__getattr__, __dir__ = forward_module("diffnas_jax.relaxations", "diffnas_jax.mixing")
