"""Magnitude selectors: argmax of the architecture weights and threshold decoding."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax._checks import check_choice
from ._tree import EMPTY_NAMES, ArchLayout, candidate_names
from diffnas_jax.spaces.base import SearchSpace

PyTree = Any


def argmax(space: SearchSpace, arch: PyTree) -> Any:
    """Magnitude selection: the candidate with the largest weight on every decision.

    The space applies its own rule (Liu et al., DARTS, ICLR 2019: per node the two incoming
    edges with the strongest non-``none`` op; NAS-Bench-201: one op per edge; MBConv: one block per
    layer), so this is ``space.genotype(arch)``.

    Args:
      space: any search space of :mod:`diffnas_jax.spaces`.
      arch: architecture logits (the space's ``init_arch`` structure).

    Returns:
      The genotype in the space's reference format.
    """
    if not callable(getattr(space, "genotype", None)):
        raise TypeError(f"`space` must have a genotype(arch) method, got {type(space).__name__}")
    return space.genotype(arch)


class ThresholdResult(NamedTuple):
    """``genotype``: the decoded architecture; ``kept``: per choice leaf, a boolean array of the
    leaf's shape marking candidates whose weight reached the threshold; ``arch``: the logits
    passed to ``space.genotype``."""

    genotype: Any
    kept: list
    arch: PyTree


_ACTIVATIONS = {
    "sigmoid": jax.nn.sigmoid,
    "softmax": lambda a: jax.nn.softmax(a, axis=-1),
    "identity": lambda a: a,
}


def threshold(space: SearchSpace, arch: PyTree, threshold: float = 0.85, activation: str = "sigmoid",
              *, drop_logit: float = -1e4) -> ThresholdResult:
    """Threshold decoding: keep the candidates whose weight reaches ``threshold``.

    FairDARTS (Chu et al., ECCV 2020, Sec. 4) trains independent sigmoid weights and decodes with
    ``sigmoid(alpha) > 0.85``. Candidates below the threshold get the logit ``drop_logit`` so the
    space's own rule only sees the kept ones; a decision with no candidate kept is set to the
    space's empty candidate (``none``/``zero``, when the space names one: an NB201 edge becomes
    ``none``, a DARTS edge is ranked last among a node's inputs) and otherwise keeps its argmax.

    Args:
      space: any search space.
      arch: architecture logits.
      threshold: the cut-off on the activated weights.
      activation: ``"sigmoid"`` (FairDARTS), ``"softmax"`` or ``"identity"`` (``arch`` already
        holds weights, e.g. a relaxation's mix).
      drop_logit: logit given to dropped candidates.

    Returns:
      A :class:`ThresholdResult` (``genotype``, ``kept`` masks, decoded ``arch``).
    """
    check_choice("activation", activation, tuple(_ACTIVATIONS))
    if not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise ValueError(f"`threshold` must be a finite number, got {threshold!r}")
    layout = ArchLayout(arch)
    act = _ACTIVATIONS[activation]
    rows_out, kept_out = [], []
    for j, a in enumerate(layout.rows(arch)):
        a = jnp.asarray(a)
        dtype = a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else jnp.float32
        a = a.astype(dtype)
        w = act(a)
        kept = w >= threshold
        any_kept = jnp.any(kept, axis=-1, keepdims=True)
        logits = jnp.where(kept, jnp.log(jnp.maximum(w, jnp.finfo(dtype).tiny)) if activation == "identity" else a,
                           jnp.asarray(drop_logit, dtype))
        names = candidate_names(space, layout, j)
        empty = next((i for i, n in enumerate(names or ()) if n.lower() in EMPTY_NAMES), None)
        if empty is not None:
            fallback = jnp.where(jnp.arange(a.shape[-1]) == empty, jnp.asarray(0.0, dtype), jnp.asarray(drop_logit, dtype))
            fallback = jnp.broadcast_to(fallback, a.shape)
        else:
            fallback = a
        rows_out.append(jnp.where(any_kept, logits, fallback))
        kept_out.append(np.asarray(jnp.reshape(kept, layout.shapes[layout.choice[j]])))
    decoded = layout.rebuild(arch, rows_out)
    return ThresholdResult(space.genotype(decoded), kept_out, decoded)
