"""Per-decision cost tables and their differentiable expectation under a relaxed architecture.

A :class:`CostTable` holds, for every categorical decision of a space's arch (same pytree
structure, ``"beta"`` excluded), the cost of each candidate, plus a ``constant`` for the parts of
the network no decision touches (stem, reductions, classifier). The expected cost of mixing
weights ``p`` is ``constant + sum(p * table)`` — linear, hence differentiable, in ``p``
(FBNet, Wu et al. CVPR 2019, Eq. 3; ProxylessNAS, Cai et al. ICLR 2019, Eq. 6). Tables are JSON
files a user can carry to, or compare with, another device.
"""
from __future__ import annotations

import json
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax.spaces.base import SearchSpace, strip_passthrough

PyTree = Any
FORMAT = "diffnas_jax.cost_table/1"


@flax.struct.dataclass
class CostTable:
    """Candidate costs per decision.

    Attributes:
      per_choice: pytree with the structure of the space's arch without ``"beta"``; each leaf
        ``(..., K)`` holds the cost of candidate ``k`` of that decision.
      constant: cost of everything no decision changes.
      metric: ``"flops"`` (multiply-adds), ``"params"`` or ``"latency"``.
      unit: e.g. ``"MAC"``, ``"count"``, ``"ms"``.
      meta_json: free-form JSON (device, input shape, raw look-up entries); see :attr:`meta`.
    """

    per_choice: PyTree
    constant: Any
    metric: str = flax.struct.field(pytree_node=False, default="flops")
    unit: str = flax.struct.field(pytree_node=False, default="")
    meta_json: str = flax.struct.field(pytree_node=False, default="{}")

    @property
    def meta(self) -> dict:
        return json.loads(self.meta_json)

    def scaled(self, factor: float) -> "CostTable":
        """The table in another unit (e.g. ``1e-6`` for MMACs)."""
        return CostTable(jax.tree_util.tree_map(lambda a: a * factor, self.per_choice), self.constant * factor,
                         self.metric, self.unit, self.meta_json)


STATIC_METRICS = ("flops", "params")


def analytic_table(per_choice: PyTree, constant: float, metric: str) -> CostTable:
    """A :class:`CostTable` of an analytic model (``metric`` ``"flops"`` in MAC or ``"params"``);
    ``ValueError`` naming ``metric`` otherwise (latency tables come from ``profile_latency``)."""
    check_static_metric(metric)
    return CostTable(jax.tree_util.tree_map(jnp.asarray, per_choice), float(constant), metric,
                     "MAC" if metric == "flops" else "count")


def check_static_metric(metric: str) -> None:
    if metric not in STATIC_METRICS:
        raise ValueError(f"unknown `metric` {metric!r}; expected 'flops' or 'params' (latency: profile_latency)")


def expected_cost_of_mix(mix: PyTree, table: CostTable) -> jax.Array:
    """``table.constant + sum_decisions sum_k mix[..., k] * table[..., k]`` (scalar, mix dtype).

    Raises ``ValueError`` when the choice leaves of ``mix`` do not match the table's shapes.
    """
    mix = strip_passthrough(mix)
    s_m, s_t = jax.tree_util.tree_structure(mix), jax.tree_util.tree_structure(table.per_choice)
    if s_m != s_t:
        raise ValueError(f"`mix` has structure {s_m} (without 'beta'), the cost table {s_t}")
    total = None
    for (path, p), c in zip(jax.tree_util.tree_leaves_with_path(mix), jax.tree_util.tree_leaves(table.per_choice)):
        p = jnp.asarray(p)
        if tuple(p.shape) != tuple(np.shape(c)):
            raise ValueError(f"`mix` leaf {jax.tree_util.keystr(path)} has shape {tuple(p.shape)}, the cost table "
                             f"{tuple(np.shape(c))}")
        if not jnp.issubdtype(p.dtype, jnp.floating):
            p = p.astype(jnp.result_type(float))
        term = jnp.sum(p * jnp.asarray(c, p.dtype))
        total = term if total is None else total + term
    return total + jnp.asarray(table.constant, total.dtype)


def expected_cost(space: SearchSpace, mix: PyTree, table: CostTable) -> jax.Array:
    """Expected FLOPs / parameters / latency of the relaxed architecture ``mix`` on ``space``.

    Linear in the mixing weights (so ``jax.grad`` gives each candidate's cost); for a one-hot
    ``mix`` of a space whose decisions add up (NB201 edges, MBConv layers) it equals the cost
    of that discrete network. For DARTS every edge of the supernet counts (the discrete cell keeps
    two inputs per node), the usual supernet-level surrogate.

    Args:
      space: the search space (``mix`` is checked against its ``arch_shapes``).
      mix: mixing weights (a relaxation's output).
      table: the space's :class:`CostTable` (:func:`diffnas_jax.cost.cost_table` or
        :func:`diffnas_jax.cost.profile_latency`).
    """
    from diffnas_jax.spaces.base import check_mix_matches

    check_mix_matches(strip_passthrough(space.arch_shapes), strip_passthrough(mix))
    return expected_cost_of_mix(mix, table)


def expected_latency(mix: PyTree, table: CostTable) -> jax.Array:
    """Expected latency (the table's unit, ms for :func:`profile_latency`) of ``mix``; see
    :func:`expected_cost`."""
    if table.metric != "latency":
        raise ValueError(f"`table` measures {table.metric!r}, not latency")
    return expected_cost_of_mix(mix, table)


def _to_json(tree):
    if isinstance(tree, dict):
        return {str(k): _to_json(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {"__list__": [_to_json(v) for v in tree]}
    a = np.asarray(tree, np.float64)
    return {"shape": list(a.shape), "values": a.ravel().tolist()}


def _from_json(obj):
    if "__list__" in obj:
        return [_from_json(v) for v in obj["__list__"]]
    if set(obj) == {"shape", "values"}:
        return jnp.asarray(np.asarray(obj["values"], np.float64).reshape(obj["shape"]))
    return {k: _from_json(v) for k, v in obj.items()}


def save_table(table: CostTable, path: str | os.PathLike) -> None:
    """Write ``table`` as JSON (exact float64 values, readable and diffable)."""
    if not isinstance(table, CostTable):
        raise TypeError(f"`table` must be a CostTable, got {type(table).__name__}")
    doc = {"format": FORMAT, "metric": table.metric, "unit": table.unit, "meta": table.meta,
           "constant": float(np.asarray(table.constant)), "per_choice": _to_json(table.per_choice)}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def load_table(path: str | os.PathLike) -> CostTable:
    """Read a table written by :func:`save_table` (``ValueError`` on another format)."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a diffnas_jax cost table (format {FORMAT!r})")
    return CostTable(_from_json(doc["per_choice"]), doc["constant"], doc["metric"], doc["unit"],
                     json.dumps(doc.get("meta", {}), sort_keys=True))


def compare_tables(table: CostTable, other: CostTable) -> dict[str, float]:
    """Per-entry ratios ``table / other`` of two latency tables' raw entries (the same ops and
    shapes profiled on two devices), plus ``"constant"`` and ``"median"`` (of the op ratios)."""
    a, b = table.meta.get("entries", {}), other.meta.get("entries", {})
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two tables share no profiled entry (different spaces or shapes?)")
    out = {k: a[k] / b[k] for k in common if b[k] > 0}
    if other.constant:
        out["constant"] = float(table.constant) / float(other.constant)
    ops = [v for k, v in out.items() if k != "constant"]
    out["median"] = float(np.median(ops)) if ops else float("nan")
    return out
