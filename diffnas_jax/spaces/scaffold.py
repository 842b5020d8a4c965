"""The scaffolding every space shares: one input check, one Flax-to-(weights, state) adapter with
PyTorch's default initialisation, and one PyTorch ``state_dict`` name mapping.

Spaces differ in their kernels (wide per-edge convolutions, vmapped edge groups) where speed
needs it; everything around the kernels is here, once.

State-dict scheme: a Flax module is named after its PyTorch twin (``"stem.0"``, ``"cells.3"``,
``"op.1"``), so the PyTorch name of a leaf is its Flax path joined with ``"."``, with the leaf
renamed (``kernel`` -> ``weight``, ``scale`` -> ``weight``, ``mean`` -> ``running_mean``, ``var``
-> ``running_var``) and the layout changed (HWIO -> OIHW convolutions, (in, out) -> (out, in)
linear layers). A space whose Flax tree differs (DARTS stacks the edges leaving one node along a
leading axis) supplies ``names(keys) -> [(module path, index along the leading axis or None)]``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
#: ``names(keys)``: Flax path keys of one leaf (without the leaf name) -> PyTorch module paths,
#: each with its index along the leaf's leading (stacked) axis or ``None``
NameMap = Callable[[tuple[str, ...]], list[tuple[str, int | None]]]

__all__ = ["check_nhwc", "torch_default_init", "flax_init", "flax_apply", "to_reference", "from_reference",
           "path_keys"]


# ---------------------------------------------------------------------------------------------
# Input check
# ---------------------------------------------------------------------------------------------
def check_nhwc(x: Any, where: str, *, multiple: int = 1, min_size: int = 1, why: str = "") -> jax.Array:
    """``x`` as a floating NHWC array, or ``ValueError`` naming ``where`` and what is wrong.

    Height and width must be at least ``min_size`` and multiples of ``multiple`` (``why`` says
    which layers need it). Integer inputs (raw images) become the default float dtype; floating
    inputs keep their dtype."""
    if not hasattr(x, "shape") or len(x.shape) != 4:
        raise ValueError(f"{where}: `x` must be an NHWC batch (B, H, W, C), got shape {getattr(x, 'shape', None)}")
    h, w = int(x.shape[1]), int(x.shape[2])
    if min(h, w) < max(min_size, multiple) or h % multiple or w % multiple:
        need = [f"at least {max(min_size, multiple)}"] + ([f"multiples of {multiple}"] if multiple > 1 else [])
        raise ValueError(f"{where}: input spatial size {(h, w)} is not supported: H and W must be "
                         f"{' and '.join(need)}{' (' + why + ')' if why else ''}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


# ---------------------------------------------------------------------------------------------
# Flax adapter
# ---------------------------------------------------------------------------------------------
def path_keys(path) -> tuple[str, ...]:
    """The string keys of a ``tree_flatten_with_path`` path."""
    return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def torch_default_init(key: jax.Array, shapes: PyTree) -> PyTree:
    """Fill a Flax variable-shape tree (``{"params": ..., "batch_stats": ...}`` from
    ``jax.eval_shape(module.init, ...)``) with PyTorch's default initialisation: every
    ``kernel`` (HWIO conv or (in, out) linear) and the ``bias`` beside it U(-1/sqrt(fan_in),
    1/sqrt(fan_in)); BatchNorm ``scale`` 1, ``bias`` 0, ``mean`` 0, ``var`` 1, counters 0.

    All random numbers come from one ``uniform`` draw that is then sliced, so the compiled program
    is small (running ``module.init`` compiles the forward pass and one PRNG kernel per
    parameter, which dominates start-up time on CPU) and ``vmap`` over keys is cheap."""
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    treedef = jax.tree_util.tree_structure(shapes)
    fan_in = {}
    for path, leaf in flat:
        n = path_keys(path)
        if n[-1] == "kernel":
            fan_in[n[:-1]] = int(np.prod(leaf.shape[:-1]))
    plan, total = [], 0
    for path, leaf in flat:
        n = path_keys(path)
        parent = n[:-1]
        if n[0] == "params" and (n[-1] == "kernel" or (n[-1] == "bias" and parent in fan_in)):
            bound = 1.0 / np.sqrt(max(fan_in[parent], 1))
            size = int(np.prod(leaf.shape))
            plan.append(("u", total, size, bound))
            total += size
        elif n[-1] in ("scale", "var"):
            plan.append(("1",))
        else:  # BN bias, running mean, num_batches_tracked
            plan.append(("0",))
    rdtype = jnp.promote_types(max((l.dtype for _, l in flat if jnp.issubdtype(l.dtype, jnp.floating)),
                                   key=lambda d: jnp.dtype(d).itemsize, default=jnp.float32), jnp.float32)
    u = jax.random.uniform(key, (max(total, 1),), rdtype, -1.0, 1.0)
    leaves = []
    for (path, leaf), how in zip(flat, plan):
        if how[0] == "u":
            _, off, size, bound = how
            leaves.append((u[off:off + size] * bound).reshape(leaf.shape).astype(leaf.dtype))
        elif how[0] == "1":
            leaves.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            leaves.append(jnp.zeros(leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def split_variables(variables: Mapping[str, Any]) -> tuple[PyTree, PyTree]:
    """``(params, batch_stats)`` of a Flax variable dict (``{}`` where absent)."""
    return dict(variables.get("params", {})), dict(variables.get("batch_stats", {}))


def flax_init(init: Callable[[jax.Array], Mapping[str, Any]], key: jax.Array) -> tuple[PyTree, PyTree]:
    """``(weights, state)`` with PyTorch's default initialisation for the variables ``init(key)``
    would create (only their shapes are traced: ``jax.eval_shape``)."""
    return split_variables(torch_default_init(key, jax.eval_shape(init, jax.random.key(0))))


def flax_apply(module: Any, weights: PyTree, state: PyTree, *args: Any, train: bool,
               rngs: Mapping[str, jax.Array] | None = None, collections: bool = False,
               extra: Mapping[str, Any] | None = None, call_kwargs: Mapping[str, Any] | None = None
               ) -> tuple[Any, PyTree]:
    """``module.apply(*args, **call_kwargs)`` on ``(weights, state)``: in train mode the state is
    mutable and its new value is returned; otherwise ``state`` comes back unchanged.

    ``state`` is the ``batch_stats`` tree, or with ``collections`` a dict ``{collection: tree}``
    of every mutable collection (user modules); ``extra`` adds read-only collections (``mix``)."""
    variables = {"params": weights, **(state if collections else {"batch_stats": state}), **(extra or {})}
    mutable = list(state) if collections else ["batch_stats"]
    kwargs = dict(call_kwargs or {})
    if train and mutable:
        out, upd = module.apply(variables, *args, rngs=rngs or {}, mutable=mutable, **kwargs)
        return out, (dict(upd) if collections else upd.get("batch_stats", state))
    return module.apply(variables, *args, rngs=rngs or {}, **kwargs), state


# ---------------------------------------------------------------------------------------------
# PyTorch state_dict mapping
# ---------------------------------------------------------------------------------------------
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var", "num_batches_tracked": "num_batches_tracked"}


def _dotted(keys: tuple[str, ...]) -> list[tuple[str, int | None]]:
    return [(".".join(keys), None)]


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
    if leaf == "num_batches_tracked":
        return value.astype(np.int64)
    return value


def _to_flax(leaf: str, value: np.ndarray, ndim: int) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim != ndim:
            raise ValueError(f"has rank {value.ndim}, expected {ndim}")
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return value


def to_reference(weights: PyTree, state: PyTree, names: NameMap = _dotted) -> dict[str, np.ndarray]:
    """The PyTorch ``state_dict`` (numpy arrays, PyTorch names and layouts) of ``(weights, state)``."""
    out: dict[str, np.ndarray] = {}
    for tree in (weights, state):
        for path, value in jax.tree_util.tree_leaves_with_path(tree):
            keys = path_keys(path)
            value = np.asarray(value)
            for module, pos in names(keys[:-1]):
                out[f"{module}.{_TORCH_LEAF[keys[-1]]}"] = _to_torch(keys[-1], value if pos is None else value[pos])
    return out


def from_reference(state_dict: Mapping[str, Any], template: tuple[PyTree, PyTree], where: str,
                   names: NameMap = _dotted, *, optional: Sequence[str] = ("num_batches_tracked",),
                   ignore: Sequence[str] = (), cast: bool = False) -> tuple[PyTree, PyTree]:
    """Inverse of :func:`to_reference`: ``(weights, state)`` shaped like ``template`` (shape/dtype
    structs) from a ``state_dict``. ``ValueError`` names a missing, mis-shaped or unexpected entry.
    Leaves named in ``optional`` default to zeros when absent (old PyTorch files have no
    ``num_batches_tracked``); entries named in ``ignore`` (e.g. ``arch_parameters``) are skipped.
    With ``cast`` every leaf takes the template's dtype; otherwise floating leaves keep the
    state_dict's (float64 references stay exact) and integer leaves (counters) the template's."""
    sd = {k: np.asarray(v) for k, v in dict(state_dict).items() if k not in ignore}
    used: set[str] = set()

    def one(path, like):
        keys = path_keys(path)
        arrays = []
        for module, pos in names(keys[:-1]):
            name = f"{module}.{_TORCH_LEAF[keys[-1]]}"
            expect = tuple(like.shape) if pos is None else tuple(like.shape[1:])
            if name not in sd:
                if keys[-1] in optional:
                    arrays.append(np.zeros(expect, like.dtype))
                    continue
                raise ValueError(f"{where}: state_dict has no entry {name!r}")
            used.add(name)
            try:
                arr = _to_flax(keys[-1], sd[name], len(expect))
            except ValueError as e:
                raise ValueError(f"{where}: state_dict entry {name!r} {e}") from None
            if tuple(arr.shape) != expect:
                raise ValueError(f"{where}: state_dict entry {name!r} has shape {sd[name].shape}, which does not "
                                 f"match the network (expected {expect} after layout change)")
            arrays.append(arr)
        stacked = names(keys[:-1])[0][1] is not None
        value = np.stack(arrays) if stacked else arrays[0]
        if cast or not jnp.issubdtype(like.dtype, jnp.floating):
            return jnp.asarray(value, like.dtype)
        return jnp.asarray(value)

    weights = jax.tree_util.tree_map_with_path(one, template[0])
    state = jax.tree_util.tree_map_with_path(one, template[1])
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"{where}: state_dict has {len(extra)} unexpected entries, e.g. {extra[:3]} "
                         "(was it saved from a network with another configuration?)")
    return weights, state
