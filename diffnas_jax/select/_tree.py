"""Pytree helpers shared by the selectors: choice leaves of an arch (without ``"beta"``)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax.spaces.base import SearchSpace, is_passthrough_path, map_choices

PyTree = Any


class ArchLayout:
    """The flattened view of an arch pytree: which leaves are categorical choices.

    ``choice`` lists the indices (in ``tree_flatten`` order) of categorical leaves; the others are
    passthrough (``"beta"``) leaves.
    """

    def __init__(self, arch: PyTree):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(arch)
        if not flat:
            raise ValueError("`arch` has no leaves")
        self.paths = [jax.tree_util.keystr(p) for p, _ in flat]
        self.passthrough = [is_passthrough_path(p) for p, _ in flat]
        self.shapes = [tuple(jnp.shape(v)) for _, v in flat]
        self.choice = [i for i, pt in enumerate(self.passthrough) if not pt]
        if not self.choice:
            raise ValueError("`arch` has no categorical leaves (only passthrough 'beta' logits)")
        for i in self.choice:
            if len(self.shapes[i]) == 0 or self.shapes[i][-1] < 1:
                raise ValueError(f"arch leaf {self.paths[i]} has shape {self.shapes[i]}; a categorical "
                                 "leaf needs a last axis of candidates")

    def leaves(self, tree: PyTree) -> list:
        leaves = jax.tree_util.tree_leaves(tree)
        if len(leaves) != len(self.shapes):
            raise ValueError(f"pytree has {len(leaves)} leaves, the arch has {len(self.shapes)}")
        return leaves

    def rows(self, tree: PyTree) -> list:
        """Choice leaves reshaped to ``(rows, candidates)``."""
        leaves = self.leaves(tree)
        return [jnp.reshape(leaves[i], (-1, self.shapes[i][-1])) for i in self.choice]

    def num_rows(self, j: int) -> int:
        shape = self.shapes[self.choice[j]]
        n = 1
        for d in shape[:-1]:
            n *= d
        return n

    def rebuild(self, tree: PyTree, rows: list, passthrough: Callable[[jax.Array], jax.Array] | None = None) -> PyTree:
        """``tree`` with its choice leaves replaced by ``rows`` (reshaped back) and, optionally,
        its passthrough leaves mapped by ``passthrough``."""
        leaves = list(self.leaves(tree))
        for j, i in enumerate(self.choice):
            # numpy rows stay numpy: host-side decoding loops avoid a device dispatch per leaf
            reshape = np.reshape if isinstance(rows[j], np.ndarray) else jnp.reshape
            leaves[i] = reshape(rows[j], self.shapes[i])
        if passthrough is not None:
            leaves = [passthrough(v) if pt else v for v, pt in zip(leaves, self.passthrough)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def default_relaxation(arch: PyTree, key: jax.Array | None = None, step: Any = 0) -> PyTree:
    """DARTS softmax over the last axis of every categorical leaf; ``"beta"`` copied unchanged."""
    return map_choices(lambda v: jax.nn.softmax(v, axis=-1), arch)


def candidate_names(space: SearchSpace, layout: ArchLayout, j: int) -> tuple[str, ...]:
    """The names of the candidates of choice leaf ``j`` (``space.candidate_names(path)``);
    ``ValueError`` when the space gives a different number of names than the leaf has."""
    k = layout.shapes[layout.choice[j]][-1]
    path = layout.paths[layout.choice[j]]
    names = tuple(str(n) for n in space.candidate_names(path))
    if len(names) != k:
        raise ValueError(f"space.candidate_names({path!r}) gives {len(names)} names, the arch leaf has {k} candidates")
    return names


EMPTY_NAMES = ("none", "zero", "zeroize")
