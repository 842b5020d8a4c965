"""The library search loop (search.loop), decision statistics, strict JSON and the compile-cache choice."""
from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax._json import NON_FINITE_KEY, dumps, to_strict, write_json
from diffnas_jax.search import compile_cache
from diffnas_jax.search.decision import UNDECIDED_MARGIN, edge_decisions, summarize_decisions
from diffnas_jax.search.loop import run_search, with_finiteness_flags
from diffnas_jax.search.state import SearchState


def _state(w):
    z = jnp.zeros(())
    return SearchState(weights={"w": w}, model_state={}, arch={"a": jnp.zeros(3)}, weight_opt_state=(),
                       arch_opt_state=(), hyper_state=(), step=jnp.zeros((), jnp.int32), key=jax.random.key(0))


def _halving_step(state, batch):
    """w <- w * batch; loss = w; a batch of inf makes the weights non-finite."""
    w = state.weights["w"] * batch
    return state.replace(weights={"w": w}), {"train_loss": jnp.ones((), w.dtype)}


def test_loop_runs_calls_back_and_stops_on_nonfinite_weights():
    step = jax.jit(with_finiteness_flags(_halving_step))
    seen, keys = [], set()
    res = run_search(lambda s, b, i: step(s, b), _state(jnp.ones(2)), [0.5, 0.5, jnp.inf, 0.5],
                     callbacks=[lambda info: seen.append((info.step, float(info.state.weights["w"][0]))),
                                lambda info: keys.update(info.metrics)])
    assert res.status == "diverged" and res.step == 3 and seen == [(1, 0.5), (2, 0.25)]
    assert res.divergence.quantity == "supernet weights"
    assert "step 3" in res.divergence.message() and "supernet weights" in res.divergence.message()
    assert keys == {"train_loss"}  # the finite_* flags are the loop's, not the callbacks'
    assert res.metrics["finite_weights"] == np.False_


def test_loop_names_the_loss_first_and_the_seed_under_vmap():
    def step(state, batch):
        new, m = _halving_step(state, batch)
        return new, {"train_loss": m["train_loss"] * batch, "arch_entropy": m["train_loss"] * batch}

    vstep = jax.jit(jax.vmap(with_finiteness_flags(step)))
    states = jax.vmap(_state)(jnp.ones((3, 2)))
    res = run_search(lambda s, b, i: vstep(s, b), states, [jnp.ones(3), jnp.array([1.0, jnp.nan, 1.0])])
    assert res.status == "diverged" and res.divergence.quantity == "train_loss" and res.divergence.seeds == (1,)
    assert "seed 7" in res.divergence.message([5, 7, 9])


def test_loop_should_stop_and_complete():
    step = jax.jit(with_finiteness_flags(_halving_step))
    res = run_search(lambda s, b, i: step(s, b), _state(jnp.ones(2)), [1.0] * 5, start_step=10,
                     should_stop=lambda: True)
    assert res.status == "stopped" and res.step == 11
    res = run_search(lambda s, b, i: step(s, b), _state(jnp.ones(2)), [1.0] * 5, start_step=10)
    assert res.status == "complete" and res.step == 15


def test_edge_decisions_extremes():
    d = edge_decisions(np.array([[1.0, 0, 0, 0, 0], [0.2] * 5, [0.6, 0.4, 0, 0, 0]]))
    np.testing.assert_allclose(d["entropy"], [0.0, 1.0, -(0.6 * math.log(0.6) + 0.4 * math.log(0.4)) / math.log(5)])
    np.testing.assert_allclose(d["margin"], [1.0, 0.0, 0.2], atol=1e-12)
    # sigmoids (FairDARTS) that do not sum to 1 are normalised first
    np.testing.assert_allclose(edge_decisions(np.array([0.9, 0.9]))["margin"], 0.0)


def test_summary_flags_an_undecided_search():
    flat = summarize_decisions({"cell": np.full((6, 5), 0.2) + np.array([0.015, 0, 0, 0, -0.015])})
    assert not flat["decided"] and flat["undecided_edges"] == 6 and flat["mean_margin"] < UNDECIDED_MARGIN
    sharp = summarize_decisions({"cell": np.tile([0.6, 0.1, 0.1, 0.1, 0.1], (6, 1))})
    assert sharp["decided"] and sharp["mean_margin"] == pytest.approx(0.5)
    assert len(sharp["edges"]["cell"]["entropy"]) == 6


def test_strict_json_nulls_and_notes_nonfinite(tmp_path):
    obj = {"a": float("nan"), "b": [1.0, np.float32(np.inf)], "c": np.array([1.0, -np.inf]), "d": 2}
    value, bad = to_strict(obj)
    assert bad == ["a", "b/1", "c/1"] and value["a"] is None and value["c"] == [1.0, None]
    text = dumps(obj)
    parsed = json.loads(text, parse_constant=lambda t: pytest.fail(t))
    assert parsed[NON_FINITE_KEY] == ["a", "b/1", "c/1"] and parsed["d"] == 2
    path = write_json(tmp_path / "x" / "r.json", obj)
    assert json.loads(path.read_text()) == parsed and not list(path.parent.glob("*.tmp"))


def test_compile_cache_choice(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_cache_dir() == tmp_path / "xdg" / "diffnas_jax" / "xla"
    assert compile_cache.resolve_cache_dir("off") is None
    assert compile_cache.resolve_cache_dir(str(tmp_path / "c")) == tmp_path / "c"
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve_cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir() == tmp_path / "env"
    assert compile_cache.resolve_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"  # the flag wins
