"""DARTS search space against the reference PyTorch code (fixture darts_reference.npz)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_same_derivatives, load_fixture, rel_err
from diffnas_jax.spaces import darts
from diffnas_jax.spaces.genotypes import DARTS_V2, Genotype


# XLA's backend optimisation barely changes run time here but halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _ce(logits, y):
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


@pytest.fixture(scope="module")
def ref():
    """The fixture's space, weights and inputs; no compilation (several light tests use it)."""
    d = load_fixture("darts_reference.npz")
    cfg = dict(zip(d["config_names"], d["config"]))
    sp = darts.search_space(C=int(cfg["C"]), num_classes=int(cfg["num_classes"]), layers=int(cfg["layers"]),
                            steps=int(cfg["steps"]), multiplier=int(cfg["multiplier"]),
                            stem_multiplier=int(cfg["stem_multiplier"]))
    sd = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
    w, s = sp.from_reference(sd)
    arch = {"normal": jnp.asarray(d["alphas_normal"]), "reduce": jnp.asarray(d["alphas_reduce"])}
    return dict(d=d, sp=sp, sd=sd, w=w, s=s, arch=arch)


def test_value_grads_and_state_match_reference(ref):
    """Logits, loss, arch and weight gradients and the BatchNorm update of one train-mode step
    against the reference. One test, not several: the supernet's value-and-grad is the costliest
    compile of the file, and a module fixture shared by several tests is built once per xdist
    worker that runs any of them. (tests/test_hypergrad.py checks the unrolled hypergradient built
    from it.)"""
    d, sp, w, s, arch = ref["d"], ref["sp"], ref["w"], ref["s"], ref["arch"]
    x = jnp.asarray(d["x"].transpose(0, 2, 3, 1))
    y = jnp.asarray(d["y"])

    def loss_fn(w, arch):
        mix = jax.tree_util.tree_map(lambda a: jax.nn.softmax(a, -1), arch)
        logits, new_state = sp.apply(w, s, mix, x, True)
        return _ce(logits, y), (logits, new_state)

    (loss, (logits, ns)), (gw, ga) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)).lower(
        w, arch).compile(compiler_options=FAST_COMPILE)(w, arch)

    assert rel_err(logits, d["logits"]) < 1e-7, "logits"
    assert rel_err(loss, d["loss"]) < 1e-7, "loss"
    assert rel_err(ga["normal"], d["grad_alphas_normal"]) < 1e-7, "grad alphas_normal"
    assert rel_err(ga["reduce"], d["grad_alphas_reduce"]) < 1e-7, "grad alphas_reduce"

    gref = {k[5:]: d[k] for k in d.files if k.startswith("grad/")}
    ours = sp.to_reference(gw, s)
    floor = 1e-6 * max(float(np.abs(v).max()) for v in gref.values())
    assert set(gref) <= set(ours)
    worst = max(rel_err(ours[k], gref[k], floor) for k in gref)
    assert worst < 1e-7, "weight gradients"

    assert int(ns["stem.1"]["num_batches_tracked"]) == 1
    # running mean moves 10 % towards the batch mean (momentum 0.1), never stays put
    assert not np.allclose(ns["stem.1"]["mean"], s["stem.1"]["mean"])
    assert jax.tree_util.tree_structure(ns) == jax.tree_util.tree_structure(s)


def test_genotype_matches(ref):
    d = ref["d"]
    g = ref["sp"].genotype(ref["arch"])
    assert [f"{o}:{i}" for o, i in g.normal] == list(d["genotype_normal"])
    assert [f"{o}:{i}" for o, i in g.reduce] == list(d["genotype_reduce"])
    assert list(g.normal_concat) == [2, 3, 4, 5]


def test_round_trip_exact(ref):
    back = ref["sp"].to_reference(*ref["sp"].from_reference(ref["sd"]))
    assert set(back) == set(ref["sd"])
    for k, v in ref["sd"].items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_bad_inputs(ref):
    sp, w, s = ref["sp"], ref["w"], ref["s"]
    x = jnp.zeros((2, 16, 16, 3))
    with pytest.raises(ValueError, match="mix"):
        sp.apply(w, s, {"normal": jnp.zeros((14, 7)), "reduce": jnp.zeros((14, 8))}, x, True)
    with pytest.raises(ValueError, match="reduction cells"):
        sp.apply(w, s, sp.init_arch(jax.random.key(0)), jnp.zeros((2, 6, 6, 3)), True)
    with pytest.raises(ValueError, match="unknown op"):
        darts.search_space(primitives=("none", "conv_9x9"))
    with pytest.raises(ValueError, match="unexpected"):
        sp.from_reference({**ref["sd"], "alphas_normal": np.zeros((14, 8))})


def test_codec_round_trip(ref):
    sp = ref["sp"]
    for seed in range(3):
        g = sp.random_genotype(jax.random.key(seed))
        assert sp.genotype(sp.arch_from_genotype(g)) == g
    g2 = sp.genotype(sp.arch_from_genotype(DARTS_V2))
    assert [tuple(p) for p in g2.normal] == [tuple(p) for p in DARTS_V2.normal]
    assert isinstance(g2, Genotype)


def test_init_shapes_vmap():
    sp = darts.search_space(C=4, layers=3, steps=2, multiplier=2)
    x = jnp.zeros((2, 8, 8, 3), jnp.float32)
    w, s = jax.vmap(sp.init, in_axes=(0, None))(jax.random.split(jax.random.key(0), 2), x)
    sd = sp.to_reference(jax.tree_util.tree_map(lambda a: a[0], w), jax.tree_util.tree_map(lambda a: a[0], s))
    assert sd["cells.0._ops.4._ops.4.op.1.weight"].shape == (4, 1, 3, 3)
    assert sd["classifier.weight"].shape == (10, 32)  # multiplier 2 x C 16 after two reductions
    # PyTorch's default init per copy: U(+-1/sqrt(fan_in)), fan_in without the stacked edge axis
    for path, k in jax.tree_util.tree_flatten_with_path(jax.tree_util.tree_map(lambda a: a[0], w))[0]:
        keys = [p.key for p in path]
        if keys[-1] != "kernel" or k.size < 64:
            continue
        lead = int(any(str(n).startswith("edges_from_") for n in keys))
        bound = 1.0 / np.sqrt(np.prod(k.shape[lead:-1]))
        m = float(np.abs(np.asarray(k)).max())
        assert 0.8 * bound < m <= bound, (jax.tree_util.keystr(path), m, bound)
    arch = sp.init_arch(jax.random.key(1))
    assert arch["normal"].shape == (5, 8)
    assert np.abs(np.asarray(arch["normal"])).max() < 1e-2


@pytest.mark.parametrize("stride,train", [(1, True), (2, True), (2, False)])
def test_mixed_op_equals_the_weighted_sum_of_its_ops(stride, train):
    # MixedOp folds each mixing weight into the op's closing BatchNorm (layers.BatchNorm2d's
    # out_scale) except on the shared pools: the same function as sum_k w_k * op_k(x) with every
    # op run alone (float64: value, running statistics, gradients in weights, mix and input, and
    # forward-over-reverse along the weights, the second-order estimators' product).
    import flax.linen as nn
    from diffnas_jax.spaces.darts_ops import make_op
    from diffnas_jax.spaces.genotypes import PRIMITIVES
    C = 4
    mixed = darts.MixedOp(C, stride, PRIMITIVES, 1, train)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, C), jnp.float64)
    w = jax.nn.softmax(jax.random.normal(jax.random.key(1), (len(PRIMITIVES),), jnp.float64))
    shapes = jax.eval_shape(lambda: mixed.init(jax.random.key(2), x, w))
    rng = np.random.default_rng(3)
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape) + 1.0, a.dtype), shapes)

    def ours(p, w, x):
        return mixed.apply({"params": p, "batch_stats": v["batch_stats"]}, x, w, mutable=["batch_stats"])

    def weighted_sum(p, w, x):
        out, new = 0.0, {}
        for idx, name in enumerate(PRIMITIVES):
            if name == "none":
                continue
            op, key = make_op(name, C, stride, affine=False, name=None, pool_bn=True), f"_ops.{idx}"
            if isinstance(op, nn.Module):
                y, upd = op.apply({"params": p.get(key, {}), "batch_stats": v["batch_stats"].get(key, {})}, x,
                                  train, mutable=["batch_stats"])
                new[key] = upd["batch_stats"]
            else:
                y = op(x, train)
            out = out + w[idx] * y
        return out, {"batch_stats": new}

    (a, na), (b, nb) = ours(v["params"], w, x), weighted_sum(v["params"], w, x)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    assert jax.tree_util.tree_structure(na) == jax.tree_util.tree_structure(nb)
    for u, t in zip(jax.tree_util.tree_leaves(na), jax.tree_util.tree_leaves(nb)):
        np.testing.assert_array_equal(u, t)
    loss = lambda f: lambda p, w, x: jnp.sum(jnp.sin(f(p, w, x)[0]) * jnp.cos(x[:, ::stride, ::stride]))  # noqa: E731
    direction = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), v["params"])
    assert_same_derivatives(loss(ours), loss(weighted_sum), (v["params"], w, x), direction, (0, 1))


@pytest.mark.parametrize("stride,k,train", [(1, 1, True), (2, 2, True), (2, 1, False)])
def test_edge_group_with_shared_pools_equals_per_edge_pools(stride, k, train):
    # The cell pools each state once for all its edges (and takes the PC-DARTS bypass once);
    # each edge keeps its own BatchNorm statistics.  Same function as pooling inside every edge
    # (float64: values, new running statistics, gradients in weights, mix and input).
    import flax.linen as nn
    prims = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3")
    C, E = 4, 3
    group = nn.vmap(darts.MixedOp, in_axes=(0, 0, None), out_axes=0, variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True})(C, stride, prims, k, train)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, C), jnp.float64)
    w = jax.nn.softmax(jax.random.normal(jax.random.key(1), (E, len(prims)), jnp.float64))
    xs = jnp.broadcast_to(x, (E,) + x.shape)
    shapes = jax.eval_shape(lambda: group.init(jax.random.key(2), xs, w, None))
    rng = np.random.default_rng(3)
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape) + 1.0, a.dtype), shapes)

    def run(shared):
        def f(p, w, x):
            xs = jnp.broadcast_to(x, (E,) + x.shape)
            parts = darts._shared_parts(x, C, stride, prims, k) if shared else None
            y, ns = group.apply({"params": p, "batch_stats": v["batch_stats"]}, xs, w, parts, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), ns
        return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(v["params"], w, x)

    (a, na), ga = run(True)
    (b, nb), gb = run(False)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    for u, t in zip(jax.tree_util.tree_leaves((na, ga)), jax.tree_util.tree_leaves((nb, gb))):
        np.testing.assert_allclose(u, t, rtol=1e-11, atol=1e-12)
