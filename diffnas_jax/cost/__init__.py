"""Cost models: FLOPs, parameters and latency of discrete and relaxed architectures.

- :func:`network_cost` — exact multiply-adds and parameter count of a space's discrete
  architecture (analytic, from op shapes; :mod:`diffnas_jax.cost.analytic`).
- :func:`cost_table` / :func:`profile_latency` — per-decision candidate costs of a space
  (:class:`CostTable`), for :func:`expected_cost` / :func:`expected_latency`, which are linear —
  hence differentiable — in the mixing weights (FBNet, Wu et al. 2019; ProxylessNAS, Cai et al.
  2019).
- :func:`count_params` / :func:`count_macs` / :func:`xla_flops` — counting the built network
  (weights pytree, jaxpr walk, XLA cost analysis), the ground truth for the analytic models.
- :func:`save_table` / :func:`load_table` — JSON files to carry between devices.
"""
from __future__ import annotations

from typing import Any, Sequence

from diffnas_jax.spaces.base import SearchSpace

from .analytic import Cost, darts_cost_table, darts_network_cost, nb201_cost_table, nb201_network_cost
from .counting import count_macs, count_params, xla_flops
from .latency import profile_latency, register_latency_profiler, time_fn
from .table import (CostTable, analytic_table, compare_tables, expected_cost, expected_cost_of_mix, expected_latency,
                    load_table, save_table, strip_passthrough)

__all__ = [
    "Cost", "CostTable", "compare_tables", "cost_table", "network_cost", "expected_cost", "expected_cost_of_mix",
    "expected_latency", "profile_latency", "register_latency_profiler", "time_fn", "save_table", "load_table",
    "count_params", "count_macs", "xla_flops", "darts_network_cost", "darts_cost_table",
    "nb201_network_cost", "nb201_cost_table", "strip_passthrough", "analytic_table",
]


def network_cost(space: SearchSpace, genotype: Any, input_shape: Sequence[int] | None = None, **network: Any) -> Cost:
    """Multiply-adds (per example) and parameters of the discrete network of ``genotype``:
    ``space.network_cost(genotype, input_shape, **network)``.

    NB201: the ``TinyNetwork`` of an arch string with the space's ``C``, ``N``, classes. DARTS:
    the evaluation network (``NetworkCIFAR``) with the space's ``C``/``layers`` unless given in
    ``network`` (e.g. ``C=36, layers=20`` for the paper's network; ``auxiliary=True`` adds the
    auxiliary head). MBConv: the discrete layer-wise network. User spaces: counted on the traced
    fixed model. An entry of ``network`` the space does not take raises ``ValueError``.

    Args:
      space: the search space.
      genotype: its discrete architecture (``space.genotype(arch)`` format).
      input_shape: ``(H, W, C_in)``; default 32x32x3 (user spaces: the example input's shape).
    """
    return space.network_cost(genotype, input_shape, **network)


def cost_table(space: SearchSpace, input_shape: Sequence[int] | None = None, metric: str = "flops",
               **network: Any) -> CostTable:
    """The per-decision candidate costs of ``space`` (``metric`` ``"flops"`` or ``"params"``):
    ``space.cost_table(input_shape, metric, **network)``.

    ``expected_cost(space, one_hot_mix, table)`` equals :func:`network_cost` of the decoded
    genotype for spaces whose decisions add up (NB201, MBConv); for DARTS the table counts every
    edge of the supernet (``network`` as in :func:`network_cost`, ``auxiliary`` included).
    """
    from .table import check_static_metric

    check_static_metric(metric)
    return space.cost_table(input_shape, metric, **network)


def __getattr__(name: str) -> Any:
    if name == "space_kind":
        import warnings

        warnings.warn("diffnas_jax.cost.space_kind is deprecated: spaces compute their own costs "
                      "(space.cost_table / space.network_cost); the registry names them "
                      "(diffnas_jax.spaces.registry.name_of)", DeprecationWarning, stacklevel=2)
        from diffnas_jax.spaces.registry import name_of

        return name_of
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
