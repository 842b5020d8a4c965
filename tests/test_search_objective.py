"""Search objectives plugged into the step: the standard loss, resource-aware losses, SD-DARTS."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffnas_jax import cost, hypergrad, mixing, regularizers
from diffnas_jax.search import LossContext, Objective, init_search_state, make_step
from diffnas_jax.search import objective as so
from diffnas_jax.spaces import nb201
from toy_space import ToyCellSpace

# the toy space compiles in seconds; the NB201 supernet only where its cost model is needed
SPACE = ToyCellSpace()
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 8, 8, 3)))
Y = jnp.asarray(RNG.integers(0, 10, 16))
BT, BV = (X[:8], Y[:8]), (X[8:], Y[8:])
W_OPT, A_OPT = optax.sgd(0.05, momentum=0.9), optax.adam(3e-2, b1=0.5, b2=0.999)
EST = hypergrad.first_order()


def _ctx(split, logits=None, mix=None, state=()):
    logits = jnp.asarray(RNG.normal(size=(4, 3))) if logits is None else logits
    return LossContext(logits, jnp.array([0, 1, 2, 0]), jnp.zeros((4, 2)), {"a": jnp.zeros((2, 3))},
                       {"a": jnp.full((2, 3), 1 / 3)} if mix is None else mix, jnp.int32(0), state, split,
                       lambda *a: None)


def _run(objective=None, steps=1, space=SPACE, **kw):
    """States and metrics after each of ``steps`` steps."""
    step = jax.jit(make_step(space, mixing.softmax(), EST, W_OPT, A_OPT, objective=objective, **kw))
    ss = init_search_state(jax.random.PRNGKey(0), space, X, W_OPT, A_OPT, EST, objective=objective)
    out = []
    for _ in range(steps):
        ss, metrics = step(ss, BT, BV)
        out.append((ss, metrics))
    return out


def test_standard_objective_is_cross_entropy_plus_arch_regulariser():
    reg = lambda arch, mix, step: 3.0 * jnp.sum(arch["a"] ** 2) + 1.0
    obj = so.standard(regularizer=reg)
    ctx = _ctx("train")
    ce = float(so.cross_entropy(ctx.logits, ctx.labels))
    np.testing.assert_allclose(float(obj.loss(ctx)), ce)
    np.testing.assert_allclose(float(obj.loss(ctx._replace(split="val"))), ce + 1.0)
    assert obj.init({"w": 1}, {}) == () and obj.update((), {}, {}, 0) == ()


def test_explicit_standard_objective_equals_the_default_step():
    reg = lambda arch, mix, step: 0.1 * sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(arch))
    with pytest.warns(DeprecationWarning, match="objective=diffnas_jax.search.objective.standard"):
        [(a, ma)] = _run(regularizer=reg)
    [(b, mb)] = _run(objective=so.standard(regularizer=reg))
    np.testing.assert_array_equal(np.asarray(a.arch["cell"]), np.asarray(b.arch["cell"]))
    np.testing.assert_array_equal(float(ma["val_loss"]), float(mb["val_loss"]))


def test_cost_aware_fbnet_is_multiplicative_on_the_val_split_only():
    table = {"a": jnp.array([[1.0, 10.0, 100.0], [1.0, 10.0, 100.0]])}
    cost_fn = lambda mix: jnp.sum(mix["a"] * table["a"])
    obj = so.cost_aware(regularizers.fbnet_loss(0.2, 0.6), cost_fn)
    ctx = _ctx("val")
    ce = float(so.cross_entropy(ctx.logits, ctx.labels))
    np.testing.assert_allclose(float(obj.loss(ctx)), ce * 0.2 * np.log(2 * 111 / 3) ** 0.6, rtol=1e-6)
    np.testing.assert_allclose(float(obj.loss(ctx._replace(split="train"))), ce)
    # the mix gradient of the arch loss points to the expensive op
    g = jax.grad(lambda m: obj.loss(ctx._replace(mix=m)))(ctx.mix)["a"]
    assert np.all(np.argmax(np.asarray(g), -1) == 2)


def test_as_objective_dispatch_and_errors():
    assert regularizers.as_objective(None) is None
    o = so.standard()
    assert regularizers.as_objective(o) is o
    assert isinstance(regularizers.as_objective(regularizers.zero_one_loss()), Objective)
    assert isinstance(regularizers.as_objective(regularizers.self_distillation(2)), Objective)
    with pytest.raises(ValueError, match="space"):
        regularizers.as_objective(regularizers.fbnet_loss())
    with pytest.raises(TypeError, match="search objective"):
        regularizers.as_objective(3.0)
    with pytest.raises(TypeError, match="combine"):
        so.cost_aware(None, lambda m: 0.0)
    with pytest.raises(ValueError, match="splits"):
        so.with_self_distillation(regularizers.self_distillation(2), splits=("test",))


def test_objective_state_must_match_and_objective_excludes_regulariser():
    sd = regularizers.as_objective(regularizers.self_distillation(2))
    step = make_step(SPACE, mixing.softmax(), EST, W_OPT, A_OPT, objective=sd)
    ss = init_search_state(jax.random.PRNGKey(0), SPACE, X, W_OPT, A_OPT, EST)  # no objective state
    with pytest.raises(ValueError, match="objective"):
        step(ss, BT, BV)
    with pytest.raises(ValueError, match="objective"):
        make_step(SPACE, mixing.softmax(), EST, W_OPT, A_OPT, objective=sd,
                  regularizer=lambda a, m, s: 0.0)


def test_proxyless_cost_objective_moves_the_arch_towards_cheap_ops():
    """With a heavy cost weight the expected FLOPs of the mix must fall step after step."""
    # a 3-node cell with one expensive op (half the compile time of the full cell); the cost of
    # its 3x3 convs still dominates the stem's and the head's, so the mix's FLOPs can fall
    space = nb201.search_space(C=4, N=1, num_classes=10, max_nodes=3, op_names=("none", "skip_connect", "nor_conv_3x3"))
    obj = regularizers.as_objective(regularizers.proxyless_loss(lam=50.0), space=space, input_shape=(8, 8, 3))
    table = cost.cost_table(space, (8, 8, 3), "flops")
    ss0 = init_search_state(jax.random.PRNGKey(0), space, X, W_OPT, A_OPT, EST, objective=obj)
    ss, _ = _run(objective=obj, steps=3, space=space)[-1]
    mix = lambda s: {"cell": jax.nn.softmax(s.arch["cell"], -1)}
    before = float(cost.expected_cost_of_mix(mix(ss0), table))
    after = float(cost.expected_cost_of_mix(mix(ss), table))
    assert after < 0.97 * before  # Adam moves each logit by ~lr per step: a few per cent in 3 steps


def test_self_distillation_state_holds_the_previous_weights_and_changes_the_loss():
    obj = regularizers.as_objective(regularizers.self_distillation(num_teachers=2, temperature=2.0, weight=5.0))
    (ss1, m1), (ss2, m2) = _run(objective=obj, steps=2)
    (_, p1), (plain, p2) = _run(steps=2)
    snaps = ss1.objective_state["snapshots"]
    assert int(snaps.count) == 1
    for w, buf in zip(jax.tree_util.tree_leaves(ss1.weights), jax.tree_util.tree_leaves(snaps.weights)):
        np.testing.assert_array_equal(np.asarray(buf[0]), np.asarray(w))
    assert int(ss2.objective_state["snapshots"].count) == 2
    # step 1 had no teacher (constant term, same weights as the plain run); step 2 has one
    np.testing.assert_allclose(float(m1["train_loss"]), float(p1["train_loss"]), rtol=1e-6)
    assert abs(float(m2["train_loss"]) - float(p2["train_loss"])) > 1e-6
    leaves = zip(jax.tree_util.tree_leaves(ss2.weights), jax.tree_util.tree_leaves(plain.weights))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves) > 0


def test_a_saved_latency_table_drives_the_cost_objective(tmp_path):
    """`diffnas search --cost table.json`: a table from `diffnas profile` (here written by hand)
    replaces the analytic FLOPs; FBNet's loss then uses its latencies."""
    table = cost.CostTable({"a": jnp.array([[1.0, 10.0, 100.0], [1.0, 10.0, 100.0]])}, 5.0, "latency", "ms")
    path = tmp_path / "lat.json"
    cost.save_table(table, path)
    obj = regularizers.as_objective(regularizers.fbnet_loss(0.2, 0.6), table=cost.load_table(path))
    ctx = _ctx("val")
    ce = float(so.cross_entropy(ctx.logits, ctx.labels))
    uniform = 2 * 111 / 3 + 5.0
    mix_cost = 25.0  # the uniform mix in the objective's unit (ABSOLUTE_COST_AT_UNIFORM)
    np.testing.assert_allclose(float(obj.loss(ctx)), ce * 0.2 * np.log(mix_cost) ** 0.6, rtol=1e-6)
    cheap = {"a": jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])}
    np.testing.assert_allclose(float(obj.loss(ctx._replace(mix=cheap))),
                               ce * 0.2 * max(np.log(25.0 * 7.0 / uniform), np.finfo(np.float64).eps) ** 0.6,
                               rtol=1e-6)
    from diffnas_jax.search.driver import SearchConfig

    assert SearchConfig(cost=str(path)).cost == str(path)
    with pytest.raises(ValueError, match="cost"):
        SearchConfig(cost="latency.json")  # no such file
