"""Pictures of a search: derived cells as graphs and architecture weights over time (matplotlib,
imported only when a function is called, on the non-interactive Agg backend)."""
from __future__ import annotations

from .cells import plot_genotype
from .trajectories import plot_arch_history

__all__ = ["plot_genotype", "plot_arch_history"]
