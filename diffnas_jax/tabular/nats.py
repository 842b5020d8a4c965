"""NAS-Bench-201 / NATS-Bench topology adapter through the optional ``nats_bench`` package.

The benchmark files (several GB) are not redistributable here: users who have them locally
point ``path`` (or ``$TORCH_HOME``) at them.
"""
from __future__ import annotations

import os

import numpy as np

from diffnas_jax._checks import check_choice
from diffnas_jax.baselines.codec import nb201_codec
from diffnas_jax.tabular.base import TabularBenchmark

_DATASETS = ("cifar10-valid", "cifar10", "cifar100", "ImageNet16-120")


def nats_bench_topology(path: str | None = None, dataset: str = "cifar10-valid", hp: str = "200") -> TabularBenchmark:
    """NATS-Bench topology search space (= NAS-Bench-201, Dong et al. 2021) as a table.

    Metrics: ``val_accuracy``, ``test_accuracy`` (percent, as the benchmark reports them),
    ``latency``, ``params``, ``flops``.

    Raises:
      ImportError: ``nats_bench`` is not installed (``pip install nats_bench``).
      FileNotFoundError: the benchmark files are not at ``path``.
    """
    check_choice("dataset", dataset, _DATASETS)
    try:
        from nats_bench import create
    except ImportError as e:
        raise ImportError("the NATS-Bench adapter needs the optional package `nats_bench` "
                          "(pip install nats_bench) and the benchmark files on local disk") from e
    if path is None:
        path = os.path.join(os.environ.get("TORCH_HOME", os.path.expanduser("~/.torch")), "NATS-tss-v1_0-3ffb9-simple")
    if not os.path.exists(path):
        raise FileNotFoundError(f"NATS-Bench topology files not found at {path!r}: download them and pass `path`")
    api = create(path, "tss", fast_mode=True, verbose=False)
    codec = nb201_codec()

    def lookup(genotype: str):
        index = api.query_index_by_arch(genotype)
        info = api.get_more_info(index, dataset, hp=hp, is_random=False)
        cost = api.get_cost_info(index, dataset, hp=hp)
        return {"val_accuracy": info.get("valid-accuracy", np.nan), "test_accuracy": info["test-accuracy"],
                "latency": cost["latency"], "params": cost["params"], "flops": cost["flops"]}

    values = {}  # filled lazily would need 15,625 queries; quantiles come from a scan on demand
    return TabularBenchmark(name=f"nats-bench-tss/{dataset}", codec=codec,
                            metrics=("val_accuracy", "test_accuracy", "latency", "params", "flops"),
                            lookup=lookup, table_values=values)
