"""Regularisers and objectives: formulas, limits, jit/vmap/grad, dtypes, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from diffnas_jax import regularizers as obj
from diffnas_jax.cost import CostTable, expected_cost_of_mix


# ------------------------------------------------------------------ cosine power annealing
def test_cosine_power_annealing_matches_the_sharpdarts_formula():
    T, hi, lo, p = 100, 0.1, 1e-4, 10.0
    s = obj.cosine_power_annealing(hi, lo, T, power=p)
    t = np.arange(T + 1)
    c = (1 + np.cos(np.pi * t / T)) / 2
    ref = lo + (hi - lo) * (p ** c - 1) / (p - 1)
    got = np.asarray(jax.vmap(s)(jnp.asarray(t)))
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert got[0] == pytest.approx(hi) and got[-1] == pytest.approx(lo)
    assert np.all(np.diff(got) <= 1e-9)  # monotone decay
    # decays faster early than plain cosine (the point of the power)
    cos = obj.cosine_power_annealing(hi, lo, T, power=1.0)
    assert float(s(25)) < float(cos(25))
    np.testing.assert_allclose(float(cos(50)), (hi + lo) / 2, rtol=1e-6)
    assert float(jax.jit(s)(1000)) == pytest.approx(lo)


def test_cosine_power_annealing_warmup_and_errors():
    s = obj.cosine_power_annealing(0.2, 0.0, 20, warmup_steps=4)
    np.testing.assert_allclose([float(s(i)) for i in range(4)], [0.05, 0.1, 0.15, 0.2], rtol=1e-6)
    assert float(s(4)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="power"):
        obj.cosine_power_annealing(0.1, 0.0, 10, power=0.5)
    with pytest.raises(ValueError, match="min_lr"):
        obj.cosine_power_annealing(0.1, 0.2, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        obj.cosine_power_annealing(0.1, 0.0, 10, warmup_steps=10)
    with pytest.raises(TypeError, match="total_steps"):
        obj.cosine_power_annealing(0.1, 0.0, 10.5)


# ------------------------------------------------------------------ resource losses
def test_resource_loss_forms():
    ce, lat = jnp.asarray(2.0), jnp.asarray(20.0)
    np.testing.assert_allclose(float(obj.fbnet_loss(0.2, 0.6)(ce, lat)), 2.0 * 0.2 * np.log(20.0) ** 0.6)
    np.testing.assert_allclose(float(obj.proxyless_loss(0.1)(ce, lat)), 2.0 + 0.1 * 20.0)
    np.testing.assert_allclose(float(obj.proxyless_loss(0.1, reference=10.0)(ce, lat)), 2.2)
    np.testing.assert_allclose(float(obj.single_path_loss(0.02)(ce, lat)), 2.0 + 0.02 * np.log(20.0))
    # gradients in the cost are right and finite, also at the edges of the domain
    for f in (obj.fbnet_loss(), obj.proxyless_loss(), obj.single_path_loss()):
        check_grads(lambda c: f(ce, c), (lat,), order=1, modes=["rev"])
        for c in (0.0, 0.5, 1.0, 1e30):
            g = jax.grad(lambda c: f(ce, c))(jnp.asarray(c))
            assert np.isfinite(float(f(ce, jnp.asarray(c)))) and np.isfinite(float(g)), (f, c)
    # dtype kept
    for dt in (jnp.float32, jnp.bfloat16):
        out = obj.fbnet_loss()(jnp.asarray(2.0, dt), jnp.asarray(20.0, dt))
        assert out.dtype == dt
    with pytest.raises(ValueError, match="alpha"):
        obj.fbnet_loss(alpha=0.0)
    with pytest.raises(ValueError, match="lam"):
        obj.proxyless_loss(lam=-1.0)


def test_budget_penalty():
    pen = obj.budget_penalty(10.0, weight=2.0)
    assert float(pen(jnp.asarray(9.0))) == 0.0
    np.testing.assert_allclose(float(pen(jnp.asarray(12.0))), 2.0 * 0.2 ** 2)
    assert float(jax.grad(pen)(jnp.asarray(10.0))) == 0.0  # smooth at the target
    with pytest.raises(ValueError, match="target"):
        obj.budget_penalty(0.0)


def _toy_table():
    per = {"normal": jnp.array([[0.0, 1.0, 4.0], [0.0, 2.0, 8.0]]), "reduce": jnp.array([[1.0, 3.0]])}
    return CostTable(per, 1.0, "flops", "M")


def test_project_to_budget_meets_the_target_and_is_a_kl_projection():
    table = _toy_table()
    mix = {"normal": jax.nn.softmax(jnp.array([[0.0, 1.0, 2.0], [0.5, 0.0, 1.0]]), -1),
           "reduce": jnp.array([[0.5, 0.5]]), "beta": {"normal": jnp.arange(2.0)}}
    before = float(expected_cost_of_mix(mix, table))
    target = 0.5 * before
    proj = obj.project_to_budget(mix, table, target)
    np.testing.assert_allclose(float(expected_cost_of_mix(proj, table)), target, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(proj["beta"]["normal"]), np.arange(2.0))
    for k in ("normal", "reduce"):  # rows keep their sums, stay non-negative
        np.testing.assert_allclose(np.asarray(proj[k].sum(-1)), np.asarray(mix[k].sum(-1)), rtol=1e-9)
        assert np.all(np.asarray(proj[k]) >= 0)
    # the exponential tilt: log(p'/p) is affine in the cost with one common slope
    slopes = []
    for k in ("normal", "reduce"):
        r = np.log(np.asarray(proj[k]) / np.asarray(mix[k]))
        c = np.asarray(table.per_choice[k])
        slopes += [np.polyfit(c[i], r[i], 1)[0] for i in range(len(c))]
    np.testing.assert_allclose(slopes, slopes[0], rtol=1e-6)
    # a loose budget leaves the mix untouched
    same = obj.project_to_budget(mix, table, 2 * before)
    np.testing.assert_allclose(np.asarray(same["normal"]), np.asarray(mix["normal"]))
    # jit and grad go through
    g = jax.grad(lambda m: expected_cost_of_mix(obj.project_to_budget(m, table, target), table))(mix)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree_util.tree_leaves(g))
    jitted = jax.jit(lambda m: obj.project_to_budget(m, table, target))(mix)
    np.testing.assert_allclose(np.asarray(jitted["normal"]), np.asarray(proj["normal"]), rtol=1e-6)


# ------------------------------------------------------------------ FairDARTS zero-one
def test_zero_one_loss():
    arch = {"a": jnp.zeros((2, 3)), "beta": {"a": jnp.ones(2) * 100}}
    assert float(obj.fairdarts_zero_one_loss(arch)) == 0.0  # all weights at 0.5: maximal loss 0
    far = {"a": jnp.full((2, 3), 50.0)}
    np.testing.assert_allclose(float(obj.fairdarts_zero_one_loss(far)), -0.25)
    np.testing.assert_allclose(float(obj.zero_one_loss(10.0)(far)), -2.5)
    g = jax.grad(obj.fairdarts_zero_one_loss)({"a": jnp.array([[0.5, -0.5]])})["a"]
    assert float(g[0, 0]) < 0 < float(g[0, 1])  # descent pushes logits away from 0
    check_grads(obj.fairdarts_zero_one_loss, ({"a": jnp.array([[0.3, -1.2, 2.0]])},), order=1, modes=["rev"])
    with pytest.raises(ValueError, match="arch"):
        obj.fairdarts_zero_one_loss({"beta": jnp.ones(2)})


# ------------------------------------------------------------------ SD-DARTS
def _apply(w, s, mix, x):
    return x @ w["k"] * mix


def test_self_distillation_voting_teachers():
    sd = obj.self_distillation(num_teachers=2, temperature=2.0, weight=0.5)
    w0 = {"k": jnp.eye(3)}
    snaps = sd.init(w0, {})
    x = jnp.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    # before any snapshot the teacher is uniform
    np.testing.assert_allclose(np.asarray(sd.teacher_probs(_apply, snaps, 1.0, x)), 1 / 3)
    ws = [{"k": jnp.eye(3) * c} for c in (1.0, 2.0, 3.0)]
    for w in ws:
        snaps = jax.jit(sd.push)(snaps, w, {})
    assert int(snaps.count) == 3
    probs = jax.jit(sd.teacher_probs, static_argnums=0)(_apply, snaps, 1.0, x)
    # the last two snapshots (c=2, 3) vote
    ref = np.mean([np.asarray(jax.nn.softmax(_apply(w, {}, 1.0, x) / 2.0)) for w in ws[1:]], 0)
    np.testing.assert_allclose(np.asarray(probs), ref, rtol=1e-6)
    # loss: zero iff the student matches, positive otherwise; grad only into the student
    student = jnp.log(jnp.asarray(ref)) * 2.0
    assert abs(float(sd.loss(student, probs))) < 1e-9
    assert float(sd.loss(jnp.zeros_like(student), probs)) > 0
    g = jax.grad(lambda t: sd.loss(jnp.zeros((2, 3)), t))(probs)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    check_grads(lambda s: obj.self_distillation_loss(s, probs, 2.0), (jnp.ones((2, 3)),), order=1, modes=["rev"])


def test_self_distillation_loss_extremes_and_dtype():
    t = jnp.array([[1.0, 0.0, 0.0]])
    for s in (jnp.array([[1e30, 0.0, -1e30]]), jnp.array([[0.0, 0.0, 0.0]])):
        v = obj.self_distillation_loss(s, t, 1.0)
        assert np.isfinite(float(v))
    out = obj.self_distillation_loss(jnp.ones((2, 3), jnp.bfloat16), jnp.full((2, 3), 1 / 3), 4.0)
    assert out.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="temperature"):
        obj.self_distillation_loss(t, t, 0.0)
    with pytest.raises(ValueError, match="num_teachers"):
        obj.self_distillation(num_teachers=0)
