"""Mixing weights of every edge over the search."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from ._mpl import new_figure, save


def plot_arch_history(steps: Sequence[int], history: Mapping[str, np.ndarray],
                      path: str | os.PathLike | None = None,
                      op_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                      edge_names: Mapping[str, Sequence[str]] | None = None, title: str = "",
                      space: Any = None) -> Any:
    """Draw one panel per edge with each op's mixing weight against the step; return the Figure.

    Every panel has the same fixed y-axis [0, 1] and a dashed line at the uniform weight
    ``1 / num_ops``: an auto-scaled axis would blow weights that moved by 0.01 up into what looks
    like a decision, and a search that did not decide must look flat. (For mixes that do not sum
    to one, e.g. FairDARTS' independent sigmoids, the dashed line is only a reference level.)

    The figure is made without pyplot, so the caller's matplotlib backend is never changed.

    Args:
      steps: ``(T,)`` step numbers of the snapshots.
      history: arch leaf name -> ``(T, num_edges, num_ops)`` (or ``(T, num_ops)``) weights in
        [0, 1], e.g. the mix the relaxation returned, recorded at the end of each epoch.
      path: if given, the figure is also written there (format from the extension, e.g. ``.png``;
        works without a display).
      op_names: op labels, one list for all leaves or one per leaf (default: the space's
        ``candidate_names`` when ``space`` is given, else ``op0``, ``op1``, ...).
      edge_names: per leaf, the edge labels (default: the space's
        :func:`~diffnas_jax.spaces.base.choice_labels`, e.g. ``1<-0``, when ``space`` is given,
        else ``leaf[e]``).
      title: figure title.
      space: the :class:`~diffnas_jax.spaces.base.SearchSpace` searched; its labels name the
        panels and ops of the leaves of ``history`` (keyed as
        :func:`~diffnas_jax.spaces.base.leaf_name`, as the driver logs them).

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    if space is not None:
        from diffnas_jax.spaces.base import arch_labels

        labels = arch_labels(space)
        if op_names is None:
            op_names = {leaf: ops for leaf, (_, ops) in labels.items()}
        if edge_names is None:
            edge_names = {leaf: rows for leaf, (rows, _) in labels.items()}
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
    fig = new_figure((3.2 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (label, w, names) in zip(axes.ravel(), panels):
        num_ops = w.shape[1]
        for k in range(num_ops):
            ax.plot(steps, w[:, k], label=(names[k] if names is not None and k < len(names) else f"op{k}"))
        ax.axhline(1.0 / num_ops, color="0.5", lw=0.8, ls="--", label=f"uniform (1/{num_ops})")
        ax.set_ylim(0.0, 1.0)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save(fig, path, dpi=100)
    return fig
