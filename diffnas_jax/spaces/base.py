"""The search-space protocol shared by every space (see shared/DESIGN.md, axis 1).

A space is a small immutable object whose methods are pure functions over explicit pytrees:

- ``init(key, x) -> (weights, state)``: network weights and BatchNorm state, separate pytrees
  (``x`` is an NHWC example batch).
- ``init_arch(key) -> arch``: architecture logits, a dict pytree.  Every leaf is a categorical
  choice over its **last** axis (e.g. DARTS ``{"normal": (14, 8), "reduce": (14, 8)}``), except
  the subtree under the key ``"beta"`` (``ARCH_PASSTHROUGH_KEY``), which holds logits that the
  space normalises itself (PC-DARTS edge normalisation). Relaxations copy it unchanged.
- ``apply(weights, state, mix, x, train, *, rng=None) -> (logits, state)``: ``mix`` has the
  structure of ``arch`` and holds mixing weights (any relaxation's output).
- ``genotype(arch)``: the discrete architecture, in the reference format of that space.
- ``from_reference(state_dict) / to_reference(weights, state)``: the reference PyTorch
  ``state_dict`` as a dict of numpy arrays.
- codec for discrete search: ``num_choices(arch_or_none)``, ``arch_from_genotype(genotype)``
  (one-hot logits), ``random_genotype(key)``.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

ARCH_PASSTHROUGH_KEY = "beta"

PyTree = Any


@runtime_checkable
class SearchSpace(Protocol):
    def init(self, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]: ...

    def init_arch(self, key: jax.Array) -> PyTree: ...

    def apply(self, weights: PyTree, state: PyTree, mix: PyTree, x: jax.Array, train: bool,
              *, rng: jax.Array | None = None) -> tuple[jax.Array, PyTree]: ...

    def genotype(self, arch: PyTree) -> Any: ...


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
