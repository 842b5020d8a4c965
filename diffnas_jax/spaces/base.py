"""The search-space protocol shared by every space (see shared/DESIGN.md, axis 1).

A space is a small immutable object whose methods are pure functions over explicit pytrees.
:class:`SearchSpace` lists every member; code outside :mod:`diffnas_jax.spaces` calls these and
never asks which space it holds (no ``hasattr``, no module names). The members:

- ``arch_shapes``: the arch pytree as ``jax.ShapeDtypeStruct`` leaves (a dict pytree).
- ``arch_kinds``: the same structure with :data:`CATEGORICAL` or :data:`PASSTHROUGH` leaves.
  A categorical leaf is a choice over its **last** axis (e.g. DARTS ``{"normal": (14, 8)}``);
  a passthrough leaf holds logits the space normalises itself (PC-DARTS edge normalisation),
  which relaxations, selectors, cost models and regularisers copy or skip. Passthrough leaves
  live under the dict key :data:`ARCH_PASSTHROUGH_KEY`; :func:`map_choices`,
  :func:`choice_leaves` and :func:`replace_choice_leaves` are the one walk over that split.
- ``init(key, x) -> (weights, state)``: network weights and BatchNorm state (``x`` NHWC).
- ``init_arch(key) -> arch``: architecture logits with the structure of ``arch_shapes``.
- ``apply(weights, state, mix, x, train, *, rng=None) -> (logits, state)``: ``mix`` has the
  structure of ``arch`` and holds mixing weights (any relaxation's output).
- ``genotype(arch)``: the discrete architecture, in the reference format of that space.
- ``arch_from_genotype(genotype)``: logits that decode back to ``genotype``.
- ``random_genotype(key)``: a uniformly random discrete architecture.
- ``codec()``: a :class:`diffnas_jax.baselines.codec.CategoricalCodec` for discrete search.
- ``candidate_names(leaf)``: the candidate names along the last axis of categorical leaf
  ``leaf`` (a ``jax.tree_util.keystr`` path such as ``"['normal']"``).
- ``topology_groups()``: ``{arch key: [(rows, keep), ...]}`` node groups of the discrete rule
  (``{}`` when every row is an independent choice).
- ``eval_network(genotype, **size) -> EvalNetwork``: the discrete network; ``size`` overrides
  the network size (an argument the network does not take is a ``ValueError``).
- ``cost_table(input_shape=None, metric="flops", **size) -> CostTable`` and
  ``network_cost(genotype, input_shape=None, **size) -> Cost``: FLOPs / parameter models.

Optional members (a space may leave them out; :func:`choice_labels` and the registry are how
the rest of the library reaches them, so nothing outside ``spaces/`` asks whether they exist):

- ``choice_labels(leaf) -> tuple[str, ...]``: a human label for each row (choice) of categorical
  leaf ``leaf``, e.g. NB201's edges ``"1<-0"``; :class:`SpaceDefaults` labels them ``name[i]``.
- a latency profiler, named by the space's registry entry
  (:attr:`diffnas_jax.spaces.registry.SpaceEntry.latency_profiler`), for ``diffnas profile``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import jax

ARCH_PASSTHROUGH_KEY = "beta"
#: leaf markers of ``SearchSpace.arch_kinds``
CATEGORICAL = "categorical"
PASSTHROUGH = "passthrough"

PyTree = Any

__all__ = [
    "ARCH_PASSTHROUGH_KEY", "CATEGORICAL", "PASSTHROUGH", "SearchSpace", "EvalNetwork", "check_mix_matches",
    "arch_kinds", "is_passthrough_path", "choice_leaves", "map_choices", "replace_choice_leaves",
    "strip_passthrough", "check_size_kwargs", "leaf_candidates", "leaf_key", "SpaceDefaults",
    "leaf_name", "choice_labels", "arch_labels",
]


@runtime_checkable
class EvalNetwork(Protocol):
    """A discrete network: the same ``init`` / ``apply`` as a space; ``apply`` ignores ``mix``."""

    def init(self, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]: ...

    def apply(self, weights: PyTree, state: PyTree, mix: Any, x: jax.Array, train: bool,
              *, rng: jax.Array | None = None) -> tuple[Any, PyTree]: ...


@runtime_checkable
class SearchSpace(Protocol):
    """Everything the library asks of a search space (see the module docstring)."""

    @property
    def arch_shapes(self) -> PyTree: ...

    @property
    def arch_kinds(self) -> PyTree: ...

    def init(self, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]: ...

    def init_arch(self, key: jax.Array) -> PyTree: ...

    def apply(self, weights: PyTree, state: PyTree, mix: PyTree, x: jax.Array, train: bool,
              *, rng: jax.Array | None = None) -> tuple[jax.Array, PyTree]: ...

    def genotype(self, arch: PyTree) -> Any: ...

    def arch_from_genotype(self, genotype: Any) -> PyTree: ...

    def random_genotype(self, key: jax.Array) -> Any: ...

    def codec(self) -> Any: ...

    def candidate_names(self, leaf: str) -> tuple[str, ...]: ...

    def topology_groups(self) -> dict[str, list[tuple[tuple[int, ...], int]]]: ...

    def eval_network(self, genotype: Any, **size: Any) -> EvalNetwork: ...

    def cost_table(self, input_shape: Sequence[int] | None = None, metric: str = "flops", **size: Any) -> Any: ...

    def network_cost(self, genotype: Any, input_shape: Sequence[int] | None = None, **size: Any) -> Any: ...


# ---------------------------------------------------------------------------------------------
# Categorical vs passthrough leaves: the one place that knows the convention
# ---------------------------------------------------------------------------------------------
def is_passthrough_path(path: Iterable[Any]) -> bool:
    """True when a ``tree_flatten_with_path`` key path lies under :data:`ARCH_PASSTHROUGH_KEY`."""
    return any(isinstance(p, jax.tree_util.DictKey) and p.key == ARCH_PASSTHROUGH_KEY for p in path)


def arch_kinds(arch_like: PyTree) -> PyTree:
    """``arch_like`` with every leaf replaced by :data:`CATEGORICAL` or :data:`PASSTHROUGH`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(arch_like)
    return jax.tree_util.tree_unflatten(
        treedef, [PASSTHROUGH if is_passthrough_path(p) else CATEGORICAL for p, _ in flat])


def strip_passthrough(tree: PyTree) -> PyTree:
    """``tree`` without its passthrough subtrees (only the categorical decisions)."""
    if isinstance(tree, Mapping):
        return {k: strip_passthrough(v) for k, v in tree.items() if k != ARCH_PASSTHROUGH_KEY}
    return tree


def choice_leaves(tree: PyTree) -> list:
    """The categorical leaves of an arch-structured pytree, in ``tree_flatten`` order."""
    return [v for p, v in jax.tree_util.tree_leaves_with_path(tree) if not is_passthrough_path(p)]


def replace_choice_leaves(tree: PyTree, new_leaves: Sequence[Any]) -> PyTree:
    """``tree`` with its categorical leaves replaced, in :func:`choice_leaves` order."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    it = iter(new_leaves)
    leaves = [v if is_passthrough_path(p) else next(it) for p, v in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def map_choices(fn: Callable[..., Any], tree: PyTree, key: jax.Array | None = None,
                passthrough: Callable[[Any], Any] | None = None) -> PyTree:
    """Apply ``fn`` to every categorical leaf (``fn(leaf)``, or ``fn(leaf, key)`` when ``key`` is
    given) and ``passthrough`` (default: identity) to the passthrough leaves.

    With a ``key`` every dict level splits it over its items in insertion order and a non-dict
    subtree over its leaves, so the key a leaf gets depends only on its place in the tree."""
    if key is None:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return jax.tree_util.tree_unflatten(treedef, [
            (v if passthrough is None else passthrough(v)) if is_passthrough_path(p) else fn(v) for p, v in flat])

    def walk(t, k):
        if isinstance(t, dict):
            keys = jax.random.split(k, max(len(t), 1))
            return {n: (jax.tree_util.tree_map(passthrough or (lambda v: v), v) if n == ARCH_PASSTHROUGH_KEY
                        else walk(v, kk)) for (n, v), kk in zip(t.items(), keys)}
        leaves, treedef = jax.tree_util.tree_flatten(t)
        keys = jax.random.split(k, max(len(leaves), 1))
        return jax.tree_util.tree_unflatten(treedef, [fn(v, kk) for v, kk in zip(leaves, keys)])

    return walk(tree, key)


# ---------------------------------------------------------------------------------------------
# Checks shared by the spaces
# ---------------------------------------------------------------------------------------------
def check_mix_matches(arch_like: PyTree, mix: PyTree, name: str = "mix") -> None:
    """Raise ``ValueError`` when ``mix`` does not have the structure and shapes of ``arch_like``."""
    s_a = jax.tree_util.tree_structure(arch_like)
    s_m = jax.tree_util.tree_structure(mix)
    if s_a != s_m:
        raise ValueError(f"`{name}` has pytree structure {s_m}, expected {s_a} (the arch structure)")
    for (path, a), m in zip(jax.tree_util.tree_leaves_with_path(arch_like), jax.tree_util.tree_leaves(mix)):
        if tuple(a.shape) != tuple(m.shape):
            raise ValueError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} has shape {tuple(m.shape)}, expected {tuple(a.shape)}")


def check_size_kwargs(where: str, given: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """``ValueError`` naming the first keyword of ``given`` that is not in ``allowed``: an argument a
    space or network does not take is an error, never silently dropped."""
    allowed = tuple(allowed)
    for k in given:
        if k not in allowed:
            raise ValueError(f"{where} does not take the argument `{k}` (it takes {', '.join(allowed) or 'none'})")


def leaf_candidates(where: str, leaf: str, table: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """``table[leaf]`` as a tuple, or a ``ValueError`` naming ``leaf`` and the known leaves."""
    if leaf not in table:
        raise ValueError(f"{where}: `leaf` {leaf!r} is not a categorical arch leaf; the leaves are {list(table)}")
    return tuple(str(n) for n in table[leaf])


def leaf_key(*keys: str) -> str:
    """The ``keystr`` of a dict path: ``leaf_key("beta", "normal") == "['beta']['normal']"``."""
    return jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in keys))


def leaf_name(path: Iterable[Any]) -> str:
    """A key path as ``"/"``-joined keys (``"cell"``, ``"beta/normal"``): how logs and plots name
    an arch leaf (the keys of the ``mix`` records in ``metrics.jsonl``)."""
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _indexed_labels(space: Any, leaf: str) -> tuple[str, ...]:
    """``name[i]`` (``name[i,j]``, ...) for each row of leaf ``leaf``; ``(name,)`` for a vector."""
    import itertools

    for path, shape in jax.tree_util.tree_leaves_with_path(space.arch_shapes):
        if jax.tree_util.keystr(path) == leaf:
            rows, name = tuple(shape.shape)[:-1], leaf_name(path)
            if not rows:
                return (name,)
            return tuple(f"{name}[{','.join(map(str, i))}]" for i in itertools.product(*(range(n) for n in rows)))
    raise ValueError(f"`leaf` {leaf!r} is not an arch leaf of this space")


def choice_labels(space: SearchSpace, leaf: str) -> tuple[str, ...]:
    """Human labels of the rows of categorical leaf ``leaf`` (a ``keystr`` path), in row-major
    order: the space's optional ``choice_labels(leaf)`` member, else ``name[i]``."""
    own = getattr(space, "choice_labels", None)
    return tuple(own(leaf)) if own is not None else _indexed_labels(space, leaf)


def arch_labels(space: SearchSpace) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``{leaf name: (row labels, candidate names)}`` for every categorical arch leaf, keyed by
    :func:`leaf_name` (as the driver logs mixes): what plots put on their panels and legends."""
    out = {}
    for path, kind in jax.tree_util.tree_leaves_with_path(space.arch_kinds):
        if kind == CATEGORICAL:
            key = jax.tree_util.keystr(path)
            out[leaf_name(path)] = (choice_labels(space, key), tuple(space.candidate_names(key)))
    return out


class SpaceDefaults:
    """Members of :class:`SearchSpace` that most spaces share; a space overrides what differs."""

    def choice_labels(self, leaf: str) -> tuple[str, ...]:
        """Row labels ``name[i]`` of categorical leaf ``leaf`` (a keystr path); spaces whose rows
        mean something (edges between nodes) override this."""
        return _indexed_labels(self, leaf)

    @property
    def arch_kinds(self) -> PyTree:
        return arch_kinds(self.arch_shapes)  # type: ignore[attr-defined]

    def topology_groups(self) -> dict[str, list[tuple[tuple[int, ...], int]]]:
        """No node groups: every row of every categorical leaf is an independent choice."""
        return {}
