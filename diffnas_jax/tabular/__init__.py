"""Tabular NAS benchmarks: compare search strategies by look-up, as in the papers.

- :class:`TabularBenchmark`: ``query(genotype, metric)``, the space's ``codec``,
  ``random_sample(key)``, ``objective(metric)`` for the discrete strategies.
- :func:`nas_bench_graph` (Qin et al., "NAS-Bench-Graph: Benchmarking Graph Neural Architecture
  Search", NeurIPS 2022 Datasets and Benchmarks): tables shipped by the PyPI package
  ``nas-bench-graph`` — 26,206 distinct GNN architectures (4-node DAG link pattern x 9 GNN ops)
  per data set with validation/test accuracy, latency and parameters.
- :func:`nats_bench_topology` (Dong et al., NATS-Bench / NAS-Bench-201) through the optional
  ``nats_bench`` package and the user's local files.
"""
from .base import TabularBenchmark
from .nasbench_graph import NBG_DATASETS, nas_bench_graph
from .nats import nats_bench_topology
from .search import reinforce_search

__all__ = ["TabularBenchmark", "nas_bench_graph", "NBG_DATASETS", "nats_bench_topology", "reinforce_search"]
