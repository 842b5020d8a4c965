"""benchmarks/digits_quality.py: the decision statistics of mixing weights and the criterion."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_script

dq = load_script(ROOT / "benchmarks" / "digits_quality.py", "digits_quality")


def test_uniform_and_one_hot_extremes():
    k = 5
    st = dq.decision_stats(jnp.full((6, k), 1.0 / k, jnp.float32))
    np.testing.assert_allclose(st["entropy"], np.log(k), rtol=1e-6)
    np.testing.assert_array_equal(st["margin"], 0.0)
    st = dq.decision_stats(jax.nn.one_hot(jnp.arange(6) % k, k, dtype=jnp.float32))
    np.testing.assert_array_equal(st["entropy"], 0.0)  # 0 log 0 = 0, not NaN
    np.testing.assert_array_equal(st["margin"], 1.0)


def test_matches_direct_formula_and_keeps_dtype():
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        p = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 6, 5)) * 2), axis=-1).astype(dtype)
        st = dq.decision_stats(p)
        assert st["entropy"].dtype == dtype and st["margin"].dtype == dtype
        assert st["entropy"].shape == st["margin"].shape == (3, 6)
        q = np.asarray(p, np.float64)
        srt = np.sort(q, -1)
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(st["margin"], np.float64), srt[..., -1] - srt[..., -2], atol=tol)
        np.testing.assert_allclose(np.asarray(st["entropy"], np.float64), -(q * np.log(q)).sum(-1), atol=tol)


def test_entropy_and_margin_order_rows_by_sharpness():
    # sharper logits: lower entropy, larger margin (the 'decided' direction)
    logits = jnp.asarray([0.0, 0.1, -0.2, 0.3, 0.05], jnp.float32)
    st = [dq.decision_stats(jax.nn.softmax(logits * s)) for s in (1.0, 5.0, 25.0)]
    assert st[0]["entropy"] > st[1]["entropy"] > st[2]["entropy"]
    assert st[0]["margin"] < st[1]["margin"] < st[2]["margin"]


def test_jit_vmap_and_nan():
    p = jnp.asarray([[0.5, 0.3, 0.2], [jnp.nan, 0.5, 0.5]], jnp.float32)
    st = jax.jit(dq.decision_stats)(p)
    assert np.isfinite(st["entropy"][0]) and np.isfinite(st["margin"][0])
    assert np.isnan(st["entropy"][1]) and np.isnan(st["margin"][1])
    v = jax.vmap(dq.decision_stats)(p[:1][None])
    np.testing.assert_allclose(v["margin"][0], st["margin"][:1])


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="probs"):
        dq.decision_stats(jnp.asarray([[1, 0]]))
    with pytest.raises(ValueError, match="probs"):
        dq.decision_stats(jnp.asarray([1.0], jnp.float32))


def test_decided_criterion():
    assert dq.decided([0.2, 0.1, 0.06, 0.3, 0.15, 0.1])
    assert not dq.decided([0.5, 0.5, 0.5, 0.5, 0.5, 0.04])  # one undecided edge
    assert not dq.decided([0.06] * 6)  # every edge above the floor, mean too low
    assert not dq.decided([0.5, np.nan])
    assert not dq.decided([])


def test_preset_parse():
    assert dq.Preset.parse("1e-2:25") == dq.Preset(1e-2, 25, 0, 64)
    assert dq.Preset.parse("3e-3:40:10:32") == dq.Preset(3e-3, 40, 10, 32)
    with pytest.raises(Exception, match="arch_lr"):
        dq.Preset.parse("1e-2")


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    # one 2-epoch search and three 2-epoch trainings (minutes on a 2-core CPU)
    report = dq.main(["--quick", "--random", "2", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    (search,) = report["searches"]
    (seed,) = search["seeds"]
    assert len(seed["margin"]) == len(seed["entropy"]) == 6
    assert all(0.0 <= m <= 1.0 for m in seed["margin"])
    assert all(0.0 <= e <= np.log(5) + 1e-6 for e in seed["entropy"])
    assert seed["decided"] == dq.decided(seed["margin"])
    assert 0.0 <= seed["test_accuracy"] <= 1.0 and len(report["random"]) == 2
    assert (tmp_path / "r.json").is_file()
    # a rerun reads the finished search and the trainings back instead of repeating them
    again = dq.main(["--quick", "--random", "2", "--workdir", str(tmp_path)])
    assert again["searches"][0]["seeds"][0]["test_accuracy"] == seed["test_accuracy"]
