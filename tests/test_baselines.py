"""Discrete strategies, codecs and tabular benchmarks."""
from __future__ import annotations

import sys
import types

import jax
import numpy as np
import pytest

from conftest import ROOT, load_script
from diffnas_jax.baselines import (CategoricalCodec, bananas, darts_codec, get_strategy, layerwise_codec,
                                   local_search, nb201_codec, random_search, regularized_evolution)
from diffnas_jax.tabular import nas_bench_graph, nats_bench_topology, reinforce_search

STRATEGIES = [random_search, local_search, regularized_evolution, bananas]


def _toy_codec():
    # a smooth landscape with a unique optimum at (3, 1, 4, 1, 5): count of matching decisions
    target = (3, 1, 4, 1, 5)
    codec = CategoricalCodec((6,) * 5, decode_fn=lambda p: p, encode_fn=lambda g: g, name="toy")
    evaluate = lambda g: {"accuracy": float(sum(a == b for a, b in zip(g, target)))}
    return codec, evaluate


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda f: f.__name__)
def test_strategies_are_deterministic_and_respect_the_budget(strategy):
    codec, objective = _toy_codec()
    kw = {"train_steps": 20} if strategy is bananas else {}
    h1 = strategy(codec, objective, 40, jax.random.PRNGKey(0), **kw)
    h2 = strategy(codec, objective, 40, jax.random.PRNGKey(0), **kw)
    assert len(h1) == 40 and h1.points == h2.points
    assert len(set(h1.points)) == 40  # distinct queries only
    assert np.all(np.diff(h1.best_so_far()) >= 0)


def test_local_search_finds_the_optimum_of_a_smooth_landscape():
    codec, objective = _toy_codec()
    h = local_search(codec, objective, 200, jax.random.PRNGKey(1))
    assert h.best[1]["accuracy"] == 5.0
    assert h.best[0] == (3, 1, 4, 1, 5)


def test_minimisation_mode_and_bad_arguments():
    codec, objective = _toy_codec()
    h = random_search(codec, objective, 30, jax.random.PRNGKey(0), mode="min")
    assert min(m["accuracy"] for m in h.metrics) == -max(h.values)
    with pytest.raises(ValueError, match="strategy"):
        get_strategy("annealing")
    with pytest.raises(ValueError, match="budget"):
        random_search(codec, objective, 0, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="metric"):
        random_search(codec, objective, 3, jax.random.PRNGKey(0), metric="loss")


def test_evaluator_is_the_black_box_name_and_objective_a_deprecated_alias():
    from diffnas_jax.baselines import Evaluator, strategies

    codec, evaluate = _toy_codec()
    h = random_search(codec, evaluate=evaluate, budget=3, key=jax.random.PRNGKey(0))
    assert len(h) == 3
    with pytest.warns(DeprecationWarning, match="Evaluator"):
        assert strategies.Objective is Evaluator


def test_nb201_codec_round_trip_and_neighbourhood():
    codec = nb201_codec()
    assert codec.size == 15625
    s = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
    p = codec.encode(s)
    assert codec.decode(p) == s
    nb = codec.neighbours(p)
    assert len(nb) == 6 * 4 and all(sum(a != b for a, b in zip(p, q)) == 1 for q in nb)
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        codec.encode("|conv~0|")


def test_darts_codec_decodes_valid_genotypes():
    pytest.importorskip("diffnas_jax.spaces.genotypes")
    prims = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
             "dil_conv_3x3", "dil_conv_5x5"]
    codec = darts_codec(prims)
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = codec.random(rng)
        g = codec.decode(p)
        assert codec.encode(g) == p
        for node in range(4):
            inputs = [i for _, i in g.normal[2 * node: 2 * node + 2]]
            assert len(set(inputs)) == 2 and max(inputs) < node + 2
            assert all(op != "none" for op, _ in g.normal)


def test_layerwise_codec_respects_allowed_ops():
    codec = layerwise_codec(["mb3", "mb5", "skip"], 3, allowed=[(0, 1), (0, 1, 2), (0, 1)])
    assert codec.cardinalities == (2, 3, 2)
    g = codec.decode((1, 2, 0))
    assert g == ["mb5", "skip", "mb3"] and codec.encode(g) == (1, 2, 0)


@pytest.fixture(scope="module")
def cora():
    return nas_bench_graph("cora")


def test_nas_bench_graph_table(cora):
    assert len(cora.table_values["val_accuracy"]) == 26206
    g = ((0, 1, 2, 3), ("gcn", "gat", "sage", "gin"))
    acc = cora.query(g, "test_accuracy")
    assert 0.0 < acc < 1.0
    # isomorphic cells share one table entry: two parallel branches can be swapped
    a = cora.query(((0, 0, 1, 1), ("gcn", "gat", "sage", "gin")), "val_accuracy")
    b = cora.query(((0, 0, 1, 1), ("gcn", "gat", "gin", "sage")), "val_accuracy")
    assert a == b
    assert cora.query(((0, 0, 0, 0), ("skip",) * 4), "val_accuracy") == 0.0
    with pytest.raises(ValueError, match="metric"):
        cora.query(g, "auc")
    with pytest.raises(ValueError, match="dataset"):
        nas_bench_graph("mnist")


def test_local_search_and_evolution_beat_random_on_nas_bench_graph(cora):
    """Small fixed budget, 10 seeds: mean best validation accuracy (White et al. 2021 finding)."""
    budget, seeds = 60, range(10)
    def mean_best(strategy):
        return np.mean([strategy(cora.codec, cora.objective(), budget, jax.random.PRNGKey(s),
                                 metric="val_accuracy").best_so_far()[-1] for s in seeds])
    rnd = mean_best(random_search)
    assert mean_best(local_search) > rnd
    assert mean_best(regularized_evolution) > rnd


def test_reinforce_search_improves_its_distribution(cora):
    """New architectures drawn late (from the learned distribution) beat the early, uniform ones."""
    early, late = [], []
    for seed in range(5):
        h = reinforce_search(cora.codec, cora.objective(), 150, jax.random.PRNGKey(seed), metric="val_accuracy")
        vals = np.asarray(h.values)
        assert len(h) == 150 and np.all(np.isfinite(vals))
        early.append(vals[:50].mean())
        late.append(vals[-50:].mean())
    assert np.mean(late) > np.mean(early)


def test_nats_bench_adapter_says_what_is_missing(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        nats_bench_topology(dataset="imagenet1k")
    monkeypatch.setitem(sys.modules, "nats_bench", None)  # an absent package
    with pytest.raises(ImportError, match="pip install nats_bench"):
        nats_bench_topology(str(tmp_path))
    monkeypatch.setitem(sys.modules, "nats_bench", types.SimpleNamespace(create=lambda *a, **k: None))
    with pytest.raises(FileNotFoundError, match="not found"):
        nats_bench_topology(str(tmp_path / "no-such-dir"))


def test_bench_tabular_counts_a_hit_on_the_last_query_as_reached():
    mod = load_script(ROOT / "benchmarks" / "bench_tabular.py", "bench_tabular")
    history = types.SimpleNamespace(best_so_far=lambda: np.array([0.1, 0.2, 0.9]))
    assert mod.queries_to_target(history, 0.9, budget=3) == (3, True)
    assert mod.queries_to_target(history, 0.95, budget=3) == (3, False)
    assert mod.queries_to_target(history, 0.2, budget=3) == (2, True)
