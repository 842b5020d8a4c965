"""Pictures of a search: derived cells as graphs and architecture weights over time.

Each function returns a ``matplotlib.figure.Figure`` drawn without pyplot (matplotlib is imported
only when a function is called) and optionally writes it to a file; the caller's backend is never
changed, so notebooks keep displaying their own plots."""
from __future__ import annotations

from .cells import plot_genotype
from .trajectories import plot_arch_history

__all__ = ["plot_genotype", "plot_arch_history"]
