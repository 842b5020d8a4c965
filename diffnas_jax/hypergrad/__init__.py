"""Hypergradient estimators for the bilevel architecture problem (axis 3 of shared/DESIGN.md).

Each constructor returns a :class:`Hypergradient` ``est``; ``est(loss_train, loss_val, weights,
arch, batch_train, batch_val) -> d_arch`` with ``loss_*(weights, arch, batch) -> scalar`` on any
pytrees, and ``est.compute(..., has_aux=..., state=..., momentum_buffer=..., step=...)`` returns a
:class:`HypergradResult` (also the training gradient where it was computed, for reuse by the
weight step). See :mod:`diffnas_jax.hypergrad._core`.

- :func:`first_order`, :func:`single_level` (no second derivatives);
- :func:`unrolled` (DARTS second order; finite-difference or exact HVP), :func:`unrolled_k`;
- :func:`implicit` (implicit function theorem; CG, normal CG, GMRES or Neumann);
- :func:`rarts` (two coupled weight copies);
- :func:`dominant_eigenvalue` (RobustDARTS' Hessian eigenvalue diagnostic).
"""
from __future__ import annotations

from ._core import Hypergradient, HypergradResult, Problem, Staged
from .diagnostics import dominant_eigenvalue
from .first_order import first_order, single_level
from .implicit import implicit
from .rarts import rarts
from .unrolled import unrolled, unrolled_k

__all__ = ["Hypergradient", "HypergradResult", "Problem", "Staged", "first_order", "single_level", "unrolled", "unrolled_k",
           "implicit", "rarts", "dominant_eigenvalue"]
