"""How decided a search is: per-edge entropy and margin of the final mixing weights.

An *edge* is one categorical choice: one row (last axis) of a mixing-weight leaf. For each edge
with weights ``w`` (``n`` candidates) we report

- ``entropy``: the Shannon entropy of ``w / sum(w)`` divided by ``ln n`` (0: one-hot, 1: uniform).
  Normalising by the sum makes it defined for relaxations whose weights do not sum to 1
  (FairDARTS' independent sigmoids, Max-W);
- ``margin``: the chosen candidate's weight minus the runner-up's, on the same normalised weights
  (0: a tie, 1: one-hot), so a margin means the same under every relaxation.

A search is *undecided* when the mean margin over its edges is below :data:`UNDECIDED_MARGIN`:
with 5 candidates, weights 0.23 / 0.20 / 0.19 / 0.19 / 0.19 already have margin 0.03, so below
0.05 the argmax genotype is a pick among near-ties (the issue #18 default search ended with
margins around 0.01).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["UNDECIDED_MARGIN", "edge_decisions", "summarize_decisions"]

UNDECIDED_MARGIN = 0.05
"""Mean margin (normalised weights) under which a finished search is reported as undecided."""


def edge_decisions(mix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-edge ``entropy`` and ``margin`` of mixing weights ``(..., n)`` (shapes ``(...)``)."""
    w = np.clip(np.asarray(mix, np.float64), 0.0, None)
    n = w.shape[-1]
    total = w.sum(-1, keepdims=True)
    p = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)
    top2 = np.sort(p, axis=-1)[..., -2:] if n > 1 else np.concatenate([np.zeros_like(p), p], -1)
    return {"entropy": h / np.log(n) if n > 1 else np.zeros(p.shape[:-1]), "margin": top2[..., 1] - top2[..., 0]}


def summarize_decisions(mix: Mapping[str, Any], threshold: float = UNDECIDED_MARGIN) -> dict[str, Any]:
    """Per-edge entropy and margin of every leaf of ``mix`` (leaf name -> weights) and a verdict.

    Returns:
      ``{"edges": {leaf: {"entropy": [...], "margin": [...]}}, "mean_entropy", "mean_margin",
      "min_margin", "undecided_edges", "decided", "threshold"}``; ``decided`` is
      ``mean_margin >= threshold``.
    """
    edges, ents, margins = {}, [], []
    for name, w in mix.items():
        d = edge_decisions(np.asarray(w))
        edges[name] = {k: v.tolist() for k, v in d.items()}
        ents.append(d["entropy"].ravel())
        margins.append(d["margin"].ravel())
    ent = np.concatenate(ents) if ents else np.zeros(0)
    mar = np.concatenate(margins) if margins else np.zeros(0)
    mean_margin = float(mar.mean()) if mar.size else 1.0
    return {"edges": edges, "mean_entropy": float(ent.mean()) if ent.size else 0.0, "mean_margin": mean_margin,
            "min_margin": float(mar.min()) if mar.size else 1.0,
            "undecided_edges": int(np.sum(mar < threshold)), "num_edges": int(mar.size),
            "decided": bool(mean_margin >= threshold), "threshold": threshold}
