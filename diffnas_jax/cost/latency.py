"""Latency look-up tables: each candidate op measured at each input shape on this device.

FBNet (Wu et al., CVPR 2019, Sec. 3.2) and ProxylessNAS (Cai et al., ICLR 2019, Sec. 3.3) model
a network's latency as the sum of its operators' latencies, measured once per device into a
look-up table; the expected latency of a relaxed architecture is then linear in the mixing
weights. Here every op is jit-compiled, warmed up, and timed as the median of ``repeats``
runs. Tables are JSON files (:func:`diffnas_jax.cost.save_table`) a user can carry to another
device and compare with that device's profile.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax._checks import check_int_in_range
from .table import CostTable
from diffnas_jax.spaces.base import SearchSpace

PyTree = Any


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``jax.jit(fn)(*args)`` in milliseconds, after ``warmup`` calls
    (the first compiles), each call waited for with ``block_until_ready``."""
    check_int_in_range("repeats", repeats, 1, 10**6)
    check_int_in_range("warmup", warmup, 1, 10**6)
    f = jax.jit(fn)
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def _placeholder(init, x):
    # timing does not depend on the weights' values: shapes from eval_shape, filled with ones,
    # spare a compilation (or a slow eager init) per op
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), x)
    return jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), shapes)


def _module_latency(module, x, repeats, warmup, *extra) -> float:
    """Eval-mode latency of ``module(x, *extra, False)``."""
    variables = _placeholder(lambda k, x: module.init(k, x, *extra, False), x)
    return time_fn(lambda v, x: module.apply(v, x, *extra, False), variables, x, repeats=repeats, warmup=warmup)


def _device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def nb201_profiler(space, input_shape, batch_size, repeats, warmup, dtype):
    """NB201: each op timed at each stage's shape (the registry entry's ``latency_profiler``)."""
    from diffnas_jax.spaces import nb201
    from .analytic import _nb201_stages

    h, w, c_in = input_shape
    entries = {}
    row = np.zeros(len(space.op_names))
    for c, (hs, ws) in _nb201_stages(space.C, (h, w)):
        x = jnp.ones((batch_size, hs, ws, c), dtype)
        for k, op in enumerate(space.op_names):
            cell = nb201.NB201InferCell(c, ((((op, 0),)),))
            ms = _module_latency(cell, x, repeats, warmup)
            entries[f"{op}@{hs}x{ws}x{c}"] = ms
            row[k] += space.N * ms
    # everything no edge decides: the network with all-"none" cells
    empty = "+".join("|" + "|".join(f"none~{j}" for j in range(i)) + "|" for i in range(1, space.max_nodes))
    net = nb201.eval_network(empty, space.C, space.N, space.num_classes)
    x = jnp.ones((batch_size, h, w, c_in), dtype)
    weights, state = _placeholder(net.init, x)
    const = time_fn(lambda wt, st, x: net.apply(wt, st, None, x, False)[0], weights, state, x,
                    repeats=repeats, warmup=warmup)
    entries["fixed"] = const
    return {"cell": np.tile(row, (space.num_edges, 1))}, const, entries


def mbconv_profiler(space, input_shape, batch_size, repeats, warmup, dtype):
    """MBConv: each allowed candidate timed at its layer's shape (the registry entry's ``latency_profiler``)."""
    from diffnas_jax.spaces import mbconv

    specs = space.layer_specs(input_shape)
    names = space.op_names
    table = np.zeros((len(specs), len(names)))
    entries, cache = {}, {}
    for i, s in enumerate(specs):
        h, w, c_in = s["in_shape"]
        x = jnp.ones((batch_size, h, w, c_in), dtype)
        for j, cand in enumerate(s["candidates"]):
            if not cand["allowed"]:
                continue  # its logit is masked: it never gets weight
            key = f"{cand['op']}@{h}x{w}x{c_in}->{s['out_shape'][2]}/s{s['stride']}"
            if key not in cache:
                layer = mbconv.MixedMBConvLayer(s["out_shape"][2], s["stride"], (cand["op"],))
                cache[key] = _module_latency(layer, x, repeats, warmup, None)
            entries[key] = table[i, j] = cache[key]
    # the fixed parts (stem, first block, head): a whole network minus its searchable layers,
    # floored at 0 (timing noise); the cheapest allowed op per layer keeps the difference small
    cheapest = [min((c for c in s["candidates"] if c["allowed"]), key=lambda c: table[i, names.index(c["op"])])["op"]
                for i, s in enumerate(specs)]
    net = space.eval_network(cheapest)
    x = jnp.ones((batch_size,) + tuple(input_shape), dtype)
    weights, state = _placeholder(net.init, x)
    whole = time_fn(lambda wt, st, x: net.apply(wt, st, None, x, False)[0], weights, state, x,
                    repeats=repeats, warmup=warmup)
    const = max(0.0, whole - sum(table[i, names.index(op)] for i, op in enumerate(cheapest)))
    entries["network:" + ",".join(cheapest)] = whole
    return {"layers": table}, const, entries


def register_latency_profiler(kind: str, profiler: Callable[..., Any]) -> None:
    """Deprecated: give the space's registry entry a ``latency_profiler``
    (:class:`diffnas_jax.spaces.registry.SpaceEntry`); this sets it on the entry of ``kind``."""
    import dataclasses
    import warnings

    from diffnas_jax.spaces import registry

    warnings.warn("register_latency_profiler is deprecated: set SpaceEntry.latency_profiler "
                  "(diffnas_jax.spaces.registry)", DeprecationWarning, stacklevel=2)
    registry.register_space(dataclasses.replace(registry.get_space(kind), latency_profiler=profiler), overwrite=True)


def profile_latency(space: SearchSpace, input_shape: Sequence[int], repeats: int = 20, *, warmup: int = 3,
                    batch_size: int = 1, dtype=jnp.float32) -> CostTable:
    """Measure a latency look-up table for ``space`` on the current default device.

    Every candidate op is timed at every input shape it meets in the network (jit, ``warmup``
    calls, median of ``repeats``); the per-decision table sums each candidate's latency over the
    cells/layers that share the decision, and ``constant`` is the latency of the rest of the
    network (its decisions all set to the empty op where the space has one).

    Args:
      space: a space whose registry entry has a ``latency_profiler`` (``nb201``, ``mbconv``;
        :func:`diffnas_jax.spaces.registry.spaces_with_latency_profiler` lists them).
      input_shape: ``(H, W, C_in)`` of one example.
      repeats: timed runs per op (median reported).
      warmup: untimed runs first (the first compiles).
      batch_size: examples per timed call.
      dtype: input dtype.

    Returns:
      A :class:`CostTable` with ``metric="latency"``, ``unit="ms"`` and ``meta`` holding the device,
      shapes and the raw per-op entries; save it with :func:`diffnas_jax.cost.save_table`.

    Raises:
      ValueError: the space has no latency profiler (named), or a bad ``input_shape``.
    """
    from diffnas_jax.spaces.registry import latency_profiler

    check_int_in_range("batch_size", batch_size, 1, 1 << 20)
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"`input_shape` must be (H, W, C_in), got {tuple(input_shape)}")
    kind, profiler = latency_profiler(space)
    per_choice, const, entries = profiler(space, tuple(int(v) for v in input_shape), batch_size, repeats, warmup,
                                          dtype)
    meta = {"device": _device(), "jax": jax.__version__, "space": kind, "input_shape": list(input_shape),
            "batch_size": batch_size, "repeats": repeats, "warmup": warmup, "dtype": jnp.dtype(dtype).name,
            "entries": entries}
    return CostTable(jax.tree_util.tree_map(jnp.asarray, per_choice), float(const), "latency", "ms",
                     json.dumps(meta, sort_keys=True))
