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

import jax.numpy as jnp

from .analytic import Cost, darts_cost_table, darts_network_cost, nb201_cost_table, nb201_network_cost
from .counting import count_macs, count_params, xla_flops
from .latency import profile_latency, register_latency_profiler, time_fn
from .table import (CostTable, compare_tables, expected_cost, expected_cost_of_mix, expected_latency, load_table, save_table,
                    strip_passthrough)

__all__ = [
    "Cost", "CostTable", "compare_tables", "cost_table", "network_cost", "expected_cost", "expected_cost_of_mix",
    "expected_latency", "profile_latency", "register_latency_profiler", "time_fn", "save_table", "load_table",
    "count_params", "count_macs", "xla_flops", "darts_network_cost", "darts_cost_table",
    "nb201_network_cost", "nb201_cost_table", "space_kind", "strip_passthrough",
]


def space_kind(space: Any) -> str:
    """``"darts"``, ``"nb201"``, ``"mbconv"`` (or another space module's name) from the space's class."""
    kind = getattr(space, "kind", None)
    if isinstance(kind, str):
        return kind
    return type(space).__module__.rsplit(".", 1)[-1]


def _nb201_cfg(space, input_shape):
    return dict(C=space.C, N=space.N, num_classes=space.num_classes,
                input_shape=tuple(input_shape) if input_shape is not None else (32, 32, 3))


def _darts_cfg(space, input_shape, network):
    cfg = {}
    for name, attr in (("C", "C"), ("layers", "layers"), ("num_classes", "num_classes"),
                       ("stem_multiplier", "stem_multiplier")):
        if hasattr(space, attr):
            cfg[name] = getattr(space, attr)
    cfg.update(network)
    cfg["input_shape"] = tuple(input_shape) if input_shape is not None else (32, 32, 3)
    return cfg


def network_cost(space: Any, genotype: Any, input_shape: Sequence[int] | None = None, **network: Any) -> Cost:
    """Multiply-adds (per example) and parameters of the discrete network of ``genotype``.

    NB201: the ``TinyNetwork`` of an arch string with the space's ``C``, ``N``, classes. DARTS:
    the evaluation network (``NetworkCIFAR``) with the space's ``C``/``layers`` unless given in
    ``network`` (e.g. ``C=36, layers=20`` for the paper's network; ``auxiliary=True`` adds the
    auxiliary head). MBConv: the space's own ``network_cost`` method when it has one.

    Args:
      space: the search space.
      genotype: its discrete architecture (``space.genotype(arch)`` format).
      input_shape: ``(H, W, C_in)``; default 32x32x3.
    """
    kind = space_kind(space)
    if kind == "mbconv":
        d = space.count_flops_params(genotype, tuple(input_shape) if input_shape is not None else (32, 32, 3))
        return Cost(int(d["flops"]), int(d["params"]))
    if kind == "nb201":
        from diffnas_jax.spaces import nb201

        cfg = _nb201_cfg(space, input_shape)
        cfg.update(network)
        return nb201_network_cost(nb201.parse_structure(genotype), **cfg)
    if kind == "darts":
        return darts_network_cost(genotype, **_darts_cfg(space, input_shape, network))
    raise ValueError(f"no cost model for {kind!r} spaces (darts, nb201, mbconv)")


def cost_table(space: Any, input_shape: Sequence[int] | None = None, metric: str = "flops",
               **network: Any) -> CostTable:
    """The per-decision candidate costs of ``space`` (``metric`` ``"flops"`` or ``"params"``).

    ``expected_cost(space, one_hot_mix, table)`` equals :func:`network_cost` of the decoded
    genotype for spaces whose decisions add up (NB201, MBConv); for DARTS the table counts every
    edge of the supernet (``network`` as in :func:`network_cost`, ``auxiliary`` included).
    """
    if metric not in ("flops", "params"):
        raise ValueError(f"unknown `metric` {metric!r}; expected 'flops' or 'params' (latency: profile_latency)")
    kind = space_kind(space)
    if kind == "mbconv":
        t = space.cost_table(tuple(input_shape) if input_shape is not None else (32, 32, 3))
        per, const = {"layers": t[metric]}, t[f"base_{metric}"]
    elif kind == "nb201":
        cfg = _nb201_cfg(space, input_shape)
        cfg.update(network)
        per, const = nb201_cost_table(space.op_names, space.num_edges, metric=metric, **cfg)
    elif kind == "darts":
        cfg = _darts_cfg(space, input_shape, network)
        for name in ("steps", "multiplier"):
            if hasattr(space, name) and name not in cfg:
                cfg[name] = getattr(space, name)
        prim = getattr(space, "primitives", None) or getattr(space, "op_names", None)
        if prim is not None and "primitives" not in cfg:
            cfg["primitives"] = tuple(prim)
        per, const = darts_cost_table(metric=metric, **cfg)
    else:
        raise ValueError(f"no cost model for {kind!r} spaces (darts, nb201, mbconv)")
    unit = "MAC" if metric == "flops" else "count"
    return CostTable({k: jnp.asarray(v) for k, v in per.items()}, float(const), metric, unit)
