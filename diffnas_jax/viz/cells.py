"""Derived cells drawn as directed graphs (NB201 cell, DARTS normal/reduce cells, layer chains)."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from diffnas_jax.spaces.genotypes import is_cell_pair

from ._mpl import new_figure, save

_NB201_TOKEN = re.compile(r"^([A-Za-z0-9_]+)~(\d+)$")


def _nb201_edges(arch: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    nodes = arch.strip().strip("|").split("+")
    names = ["in"] + [str(i + 1) for i in range(len(nodes))]
    names[-1] = "out"
    edges = []
    for i, node in enumerate(nodes, start=1):
        for tok in node.strip("|").split("|"):
            m = _NB201_TOKEN.match(tok)
            if m is None:
                raise ValueError(f"`genotype`: cannot parse NB201 token {tok!r} in {arch!r}")
            op, j = m.group(1), int(m.group(2))
            if op != "none":
                edges.append((names[j], names[i], op))
    return names, edges


def _darts_edges(ops: Sequence[tuple[str, int]], concat: Sequence[int]) -> tuple[list[str], list[tuple[str, str, str]]]:
    steps = len(ops) // 2
    names = ["c_{k-2}", "c_{k-1}"] + [str(i) for i in range(steps)] + ["c_{k}"]
    edges = []
    for k, (op, j) in enumerate(ops):
        edges.append((names[j], str(k // 2), op))
    for c in concat:
        edges.append((names[c], "c_{k}", ""))
    return names, edges


def _layout(names: list[str]) -> dict[str, tuple[float, float]]:
    if names[0] == "c_{k-2}":
        # DARTS: both cell inputs on the left, intermediate nodes staggered, output on the right
        inner = names[2:-1]
        pos = {"c_{k-2}": (0.0, 0.55), "c_{k-1}": (0.0, -0.55), names[-1]: (1.0, 0.0)}
        for i, nm in enumerate(inner):
            pos[nm] = (0.25 + 0.55 * i / max(len(inner) - 1, 1), 0.45 if i % 2 == 0 else -0.45)
        return pos
    n = len(names)
    return {nm: (i / max(n - 1, 1), 0.0) for i, nm in enumerate(names)}


def _draw(ax, names: list[str], edges: list[tuple[str, str, str]], title: str) -> None:
    pos = _layout(names)
    n = len(names)
    ax.set_xlim(-0.1, 1.1)
    ax.set_ylim(-0.8, 0.8)
    to_disp, to_data = ax.transData.transform, ax.transData.inverted().transform
    for src, dst, op in edges:
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        span = abs(names.index(dst) - names.index(src))
        # on a line of nodes, longer edges bend further so arcs and labels do not overlap
        rad = -0.22 * (span - 1) if (y0 == y1 == 0.0 and n > 2) else 0.0
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color="0.35", lw=1.1, shrinkA=13, shrinkB=13,
                                    connectionstyle=f"arc3,rad={rad}"))
        if op:
            # a point of matplotlib's arc3 quadratic Bezier (computed in display space), past the
            # middle so labels of edges leaving the same node separate
            (a0, b0), (a1, b1) = to_disp((x0, y0)), to_disp((x1, y1))
            ca, cb = (a0 + a1) / 2 + rad * (b1 - b0), (b0 + b1) / 2 - rad * (a1 - a0)
            t = 0.5 if rad else 0.6
            pa = (1 - t) ** 2 * a0 + 2 * t * (1 - t) * ca + t ** 2 * a1
            pb = (1 - t) ** 2 * b0 + 2 * t * (1 - t) * cb + t ** 2 * b1
            xm, ym = to_data((pa, pb))
            ax.text(xm, ym, op, fontsize=7, ha="center", va="center",
                    bbox=dict(boxstyle="round,pad=0.2", fc="lightyellow", ec="0.7"))
    for nm, (x, y) in pos.items():
        color = "lightblue" if nm in ("in", "c_{k-2}", "c_{k-1}") else ("palegreen" if nm in ("out", "c_{k}") else "w")
        label = f"${nm}$" if "{" in nm else nm
        ax.text(x, y, label, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="circle,pad=0.3", fc=color, ec="k"))
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def plot_genotype(genotype: Any, path: str | os.PathLike | None = None, title: str | None = None) -> Any:
    """Draw a derived architecture as a graph; return the ``matplotlib.figure.Figure``.

    The figure is made without pyplot, so the caller's matplotlib backend is never changed; in a
    notebook ``display(fig)`` (or the figure as a cell's last expression) shows it.

    Args:
      genotype: an NB201 arch string (``|op~0|+|op~0|op~1|+...``; ``none`` edges are omitted), a
        DARTS ``Genotype`` (anything with ``normal``, ``normal_concat``, ``reduce``,
        ``reduce_concat``; both cells are drawn), a sequence of op names (a layer-wise space
        such as MBConv, drawn as a chain) or a ``{choice: chosen}`` dict (a user space, a chain).
      path: if given, the figure is also written there (format from the extension, e.g. ``.png``;
        works without a display).
      title: figure title (defaults to the space's name).

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    if isinstance(genotype, str):
        names, edges = _nb201_edges(genotype)
        fig = new_figure((6, 3))
        ax = fig.subplots()
        _draw(ax, names, edges, title or "NB201 cell")
    elif is_cell_pair(genotype):
        fig = new_figure((12, 3.5))
        axes = fig.subplots(1, 2)
        for ax, kind in zip(axes, ("normal", "reduce")):
            names, edges = _darts_edges(getattr(genotype, kind), getattr(genotype, f"{kind}_concat"))
            _draw(ax, names, edges, f"{kind} cell")
        if title:
            fig.suptitle(title)
    elif (isinstance(genotype, Mapping) or isinstance(genotype, (list, tuple))
          and all(isinstance(o, str) for o in genotype)):
        ops = ([f"{k}: {v}" for k, v in genotype.items()] if isinstance(genotype, Mapping) else list(genotype))
        names = ["in"] + [f"L{i}" for i in range(len(ops))]
        edges = [(names[i], names[i + 1], op) for i, op in enumerate(ops)]
        fig = new_figure((max(6, 1.2 * len(genotype)), 2.5))
        ax = fig.subplots()
        _draw(ax, names, edges, title or "layers")
        ax.set_ylim(-0.6, 0.6)
    else:
        raise TypeError(f"`genotype` must be an NB201 string, a DARTS Genotype, a dict or a list of op names, "
                        f"got {type(genotype).__name__}")
    fig.tight_layout()
    save(fig, path, dpi=110)
    return fig
