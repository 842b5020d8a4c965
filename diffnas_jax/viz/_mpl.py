"""Figures drawn without pyplot, so plotting never switches or touches the caller's backend.

A ``matplotlib.figure.Figure`` made directly (not through ``pyplot``) belongs to no backend and
to no global figure manager: ``savefig`` picks a renderer from the file extension (Agg for PNG),
which works on a machine without a display, and in a notebook the returned figure is shown by
the notebook's own backend (``display(fig)``, or as the cell's last expression).
"""
from __future__ import annotations

import os
from typing import Any


def new_figure(figsize: tuple[float, float]) -> Any:
    """A ``matplotlib.figure.Figure`` of ``figsize`` inches, outside pyplot's state."""
    from matplotlib.figure import Figure  # imported here: keeps `import diffnas_jax` light

    return Figure(figsize=figsize)


def save(fig: Any, path: str | os.PathLike | None, dpi: int) -> None:
    """Write ``fig`` to ``path`` (format from the extension); nothing when ``path`` is None."""
    if path is not None:
        fig.savefig(path, dpi=dpi)
