"""Lazy matplotlib import on a file-only backend (the driver may run without a display)."""
from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
