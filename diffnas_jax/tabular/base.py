"""The tabular-benchmark interface."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from diffnas_jax._checks import check_choice
from diffnas_jax.baselines.codec import CategoricalCodec, numpy_rng


@dataclasses.dataclass(frozen=True)
class TabularBenchmark:
    """A table of trained architectures behind a discrete codec.

    Attributes:
      name: e.g. ``"nas-bench-graph/cora"``.
      codec: the space's :class:`CategoricalCodec`; genotypes are ``codec.decode(point)``.
      metrics: names ``query`` accepts.
      lookup: ``genotype -> dict of metrics`` (the table).
      table_values: ``metric -> array`` over every distinct architecture of the table, for
        quantiles ("top 1 %") without enumerating the space.
    """

    name: str
    codec: CategoricalCodec
    metrics: tuple[str, ...]
    lookup: Callable[[Any], Mapping[str, float]]
    table_values: Mapping[str, np.ndarray]

    def query(self, genotype: Any, metric: str) -> float:
        """The table's ``metric`` for ``genotype``."""
        check_choice("metric", metric, self.metrics)
        return float(self.lookup(genotype)[metric])

    def random_sample(self, key: jax.Array) -> Any:
        """A uniformly random genotype of the codec."""
        return self.codec.decode(self.codec.random(numpy_rng(key)))

    def objective(self) -> Callable[[Any], Mapping[str, float]]:
        """``genotype -> dict of all metrics``, the form the discrete strategies take."""
        return lambda g: dict(self.lookup(g))

    def quantile(self, metric: str, q: float) -> float:
        """The ``q`` quantile of ``metric`` over the table (``q=0.99``: the top-1 % threshold)."""
        check_choice("metric", metric, self.metrics)
        if metric not in self.table_values:
            raise ValueError(f"{self.name}: the table's distribution of `metric` {metric!r} is not available")
        return float(np.quantile(self.table_values[metric], q))
