"""The DARTS search cell's two edge formulations (one ``lax.scan`` per cell and stride against one
``vmap`` per source state) compute the same function on the same parameter layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax.spaces import darts
from diffnas_jax.spaces.genotypes import PRIMITIVES

_SMALL = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")


def _cell_and_variables(formulation, reduction, k, prims, train, steps=3, C=4):
    cell = darts.SearchCell(steps, 2, C, reduction, False, prims, k, train, formulation)
    s0 = jax.random.normal(jax.random.key(0), (2, 4, 4, C), jnp.float64)
    s1 = jax.random.normal(jax.random.key(1), (2, 4, 4, C), jnp.float64)
    e = darts._num_edges(steps)
    w = jax.nn.softmax(jax.random.normal(jax.random.key(2), (e, len(prims)), jnp.float64))
    w_edge = darts.edge_weights(jax.random.normal(jax.random.key(4), (e,), jnp.float64), steps) if k > 1 else None
    # eval_shape + host draws (cell.init would compile the forward pass); running statistics
    # away from (0, 1) so their update is visible
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(3), s0, s1, w, w_edge))
    rng = np.random.default_rng(3)
    variables = jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape) + 1.0, a.dtype) if a.dtype == jnp.float64
        else jnp.asarray(rng.integers(0, 5, size=a.shape), a.dtype), shapes)
    return cell, variables, (s0, s1, w, w_edge)


def _value_grads_stats(formulation, reduction, k, prims, train):
    # two steps: 5 edges from 3 source states, the second node reading the first (a stride-2 and a
    # stride-1 scan in a reduction cell); a third step only adds edges of the same kinds (compile time)
    cell, v, (s0, s1, w, w_edge) = _cell_and_variables(formulation, reduction, k, prims, train, steps=2)

    def f(params, s0, w, w_edge):
        variables = {"params": params, "batch_stats": v["batch_stats"]}
        if train:
            y, upd = cell.apply(variables, s0, s1, w, w_edge, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), upd["batch_stats"]
        return jnp.sum(jnp.sin(cell.apply(variables, s0, s1, w, w_edge))), v["batch_stats"]

    return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3) if k > 1 else (0, 1, 2), has_aux=True),
                   static_argnums=() if k > 1 else (3,))(v["params"], s0, w, w_edge)


@pytest.mark.parametrize("reduction,k,prims,train", [
    (False, 1, PRIMITIVES, True),   # a normal cell, every DARTS op
    (True, 2, _SMALL, True),        # a PC-DARTS reduction cell (a stride-2 scan, then a stride-1
                                    # one; partial channels, edge normalisation)
    (False, 2, _SMALL, False),      # eval mode: running statistics read, not written
])
def test_scanned_cell_equals_grouped_cell(reduction, k, prims, train):
    (va, sa), ga = _value_grads_stats("scan", reduction, k, prims, train)
    (vb, sb), gb = _value_grads_stats("groups", reduction, k, prims, train)
    np.testing.assert_allclose(va, vb, rtol=1e-12)
    assert jax.tree_util.tree_structure((sa, ga)) == jax.tree_util.tree_structure((sb, gb))
    for a, b in zip(jax.tree_util.tree_leaves((sa, ga)), jax.tree_util.tree_leaves((sb, gb))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    if train:
        _, v, _ = _cell_and_variables("scan", reduction, k, prims, train, steps=2)
        moved = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(sa),
                                                        jax.tree_util.tree_leaves(v["batch_stats"]))]
        assert all(moved), "every running statistic of every edge must be updated in train mode"


def test_scanned_cell_has_one_mixed_op_body_per_stride():
    # The point of the scan: a normal cell's program holds one mixed op, not one per source
    # state (5), so the lowered program is several times smaller (3x measured).
    def lines(formulation):
        cell, v, (s0, s1, w, _) = _cell_and_variables(formulation, False, 1, PRIMITIVES, True, steps=4)

        def f(params):
            y, _ = cell.apply({"params": params, "batch_stats": v["batch_stats"]}, s0, s1, w, None,
                              mutable=["batch_stats"])
            return jnp.sum(y)
        return jax.jit(jax.grad(f)).lower(v["params"]).as_text().count("\n")

    assert lines("scan") < 0.5 * lines("groups")


def test_default_cell_formulation(monkeypatch):
    monkeypatch.delenv("DIFFNAS_DARTS_CELL", raising=False)
    assert darts.default_cell_formulation("cpu") == "groups"   # the scan steps slower (BUILD_NOTES section 5, round 4)
    monkeypatch.setenv("DIFFNAS_DARTS_CELL", "scan")
    assert darts.default_cell_formulation("cpu") == "scan"
    monkeypatch.setenv("DIFFNAS_DARTS_CELL", "vmap")
    with pytest.raises(ValueError, match="DIFFNAS_DARTS_CELL"):
        darts.default_cell_formulation()
    with pytest.raises(TypeError, match="backend"):
        darts.default_cell_formulation(3)
    cell = darts.SearchCell(2, 2, 4, False, False, ("skip_connect",), 1, True, "unrolled")
    x = jnp.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match="formulation"):
        jax.eval_shape(lambda: cell.init(jax.random.key(0), x, x, jnp.ones((5, 1)), None))


def test_scanned_cell_forward_over_reverse_equals_grouped_cell():
    # The exact second-order hypergradient differentiates the weight gradient forward in the
    # mix weights (jvp of grad) through the scan; both cells must agree there too (float64).
    prims = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
    out = {}
    for form in ("scan", "groups"):
        cell, v, (s0, s1, w, _) = _cell_and_variables(form, True, 1, prims, True, steps=2)

        def loss(p, w, cell=cell, v=v, s0=s0, s1=s1):
            y, _ = cell.apply({"params": p, "batch_stats": v["batch_stats"]}, s0, s1, w, None,
                              mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y))

        # jitted: one program per formulation compiles in about half the eager op-by-op time
        hvp = jax.jit(lambda p, w, loss=loss: jax.jvp(lambda w: jax.grad(loss)(p, w), (w,), (jnp.ones_like(w),))[1])
        out[form] = hvp(v["params"], w)
    for a, b in zip(jax.tree_util.tree_leaves(out["scan"]), jax.tree_util.tree_leaves(out["groups"])):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
