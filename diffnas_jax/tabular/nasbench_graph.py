"""NAS-Bench-Graph adapter (Qin et al., NeurIPS 2022 Datasets and Benchmarks).

The space: a 4-node DAG whose wiring is one of 9 canonical link patterns, and one of 9 GNN ops
per node (gat, gcn, gin, cheb, sage, arma, graph, fc, skip). The package's own ``Arch`` class maps
any (link, ops) pair to its isomorphism-canonical hash, which keys the table; we use it for that
and read the table files with the library's restricted unpickler (the package's own reader uses
plain ``pickle``).
"""
from __future__ import annotations

import functools
import itertools
import os

import numpy as np

from diffnas_jax._checks import check_choice
from diffnas_jax._safe_pickle import safe_load
from diffnas_jax.baselines.codec import CategoricalCodec
from diffnas_jax.tabular.base import TabularBenchmark

NBG_DATASETS = ("cora", "citeseer", "pubmed", "cs", "physics", "photo", "computers", "arxiv")
_METRICS = {"valid_perf": "val_accuracy", "perf": "test_accuracy", "latency": "latency", "para": "params"}


def _package():
    try:
        import nas_bench_graph  # noqa: F401
        from nas_bench_graph import architecture
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("NAS-Bench-Graph needs the package `nas-bench-graph` (pip install nas-bench-graph)") from e
    return os.path.dirname(nas_bench_graph.__file__), architecture


@functools.lru_cache(maxsize=None)
def _load(dataset: str):
    root, arch_mod = _package()
    path = os.path.join(root, "light", f"{dataset}.bench")
    if not os.path.exists(path):
        raise FileNotFoundError(f"NAS-Bench-Graph table for {dataset!r} not found at {path}")
    with open(path, "rb") as f:
        table = safe_load(f)
    links = [tuple(lk) for lk in arch_mod.link_list]
    ops = tuple(arch_mod.gnn_list)
    # every point of the product space -> its canonical table key (all-skip cells are invalid)
    keys = np.full((len(links),) + (len(ops),) * 4, -1, np.int64)
    for li, lk in enumerate(links):
        for op_idx in itertools.product(range(len(ops)), repeat=4):
            names = [ops[i] for i in op_idx]
            if all(n == "skip" for n in names):
                continue
            keys[(li,) + op_idx] = arch_mod.Arch(list(lk), names).valid_hash()
    entries = {k: {_METRICS[m]: float(v) for m, v in rec.items() if m in _METRICS} for k, rec in table.items()}
    values = {m: np.asarray([rec[m] for rec in entries.values()], np.float64) for m in _METRICS.values()}
    return links, ops, keys, entries, values


def nas_bench_graph(dataset: str = "cora") -> TabularBenchmark:
    """The NAS-Bench-Graph table of ``dataset`` as a :class:`TabularBenchmark`.

    Genotypes are ``(link, ops)`` pairs, e.g. ``((0, 0, 1, 2), ("gcn", "gat", "skip", "sage"))``.
    Metrics: ``val_accuracy``, ``test_accuracy``, ``latency`` (seconds), ``params`` (millions).
    The all-skip cell is not a valid GNN: it scores 0 accuracy and infinite latency.
    (The ``proteins`` table uses a reduced op set and is not adapted.)
    """
    check_choice("dataset", dataset, NBG_DATASETS)
    links, ops, keys, entries, values = _load(dataset)
    invalid = {"val_accuracy": 0.0, "test_accuracy": 0.0, "latency": float("inf"), "params": 0.0}

    def decode(p):
        return links[p[0]], tuple(ops[i] for i in p[1:])

    def encode(g):
        link, names = g
        try:
            return (links.index(tuple(link)),) + tuple(ops.index(n) for n in names)
        except ValueError as e:
            raise ValueError(f"genotype {g!r} is not in the NAS-Bench-Graph space: {e}") from None

    codec = CategoricalCodec((len(links),) + (len(ops),) * 4, decode, encode, name=f"nas-bench-graph/{dataset}")

    def lookup(genotype):
        key = int(keys[encode(genotype)])
        return invalid if key < 0 else entries[key]

    return TabularBenchmark(name=f"nas-bench-graph/{dataset}", codec=codec,
                            metrics=tuple(_METRICS.values()), lookup=lookup, table_values=values)
