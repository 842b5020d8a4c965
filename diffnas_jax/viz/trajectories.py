"""Mixing weights of every edge over the search."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from ._mpl import pyplot


def plot_arch_history(steps: Sequence[int], history: Mapping[str, np.ndarray], path: str | os.PathLike,
                      op_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                      edge_names: Mapping[str, Sequence[str]] | None = None, title: str = "") -> str:
    """Write a PNG with one panel per edge showing each op's mixing weight against the step.

    Args:
      steps: ``(T,)`` step numbers of the snapshots.
      history: arch leaf name -> ``(T, num_edges, num_ops)`` (or ``(T, num_ops)``) weights, e.g.
        ``softmax(alpha)`` recorded at the end of each epoch.
      path: output file.
      op_names: op labels, one list for all leaves or one per leaf.
      edge_names: per leaf, the edge labels (defaults to ``leaf[e]``).
      title: figure title.
    """
    plt = pyplot()
    panels = []
    for leaf, arr in history.items():
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim == 2:
            arr = arr[:, None, :]
        if arr.ndim != 3 or arr.shape[0] != len(steps):
            raise ValueError(f"`history[{leaf!r}]` must be (T, edges, ops) with T={len(steps)}, got {arr.shape}")
        names = (op_names.get(leaf) if isinstance(op_names, Mapping) else op_names)
        for e in range(arr.shape[1]):
            label = edge_names[leaf][e] if edge_names and leaf in edge_names else f"{leaf}[{e}]"
            panels.append((label, arr[:, e, :], names))
    if not panels:
        raise ValueError("`history` is empty")
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharex=True)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (label, w, names) in zip(axes.ravel(), panels):
        for k in range(w.shape[1]):
            ax.plot(steps, w[:, k], label=(names[k] if names is not None and k < len(names) else f"op{k}"))
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
