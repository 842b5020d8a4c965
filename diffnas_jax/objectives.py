"""Deprecated name of :mod:`diffnas_jax.regularizers` (regularisers, cost losses and schedules of NAS methods; renamed because "objective" means the search step's loss protocol, diffnas_jax.search.objective); kept for one release.

Attribute access forwards to :mod:`diffnas_jax.regularizers` with a ``DeprecationWarning``.
"""
from diffnas_jax._deprecated import forward_module

__getattr__, __dir__ = forward_module("diffnas_jax.objectives", "diffnas_jax.regularizers")
