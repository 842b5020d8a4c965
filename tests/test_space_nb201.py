"""NAS-Bench-201 space: conformance with AutoDL-Projects' TinyNetworkDarts (fixture), state_dict
round trip, arch-string codec, TinyNetwork eval network and bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_same_derivatives, load_fixture, rel_err
from diffnas_jax.spaces import nb201

# Test-only: XLA backend optimisation level 0 halves compile time (one call per program here).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(fn, *args, static_argnums=()):
    return jax.jit(fn, static_argnums=static_argnums).lower(*args).compile(compiler_options=FAST_COMPILE)


BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"


@pytest.fixture(scope="module")
def ref():
    d = load_fixture("nb201_reference.npz")
    C, N, max_nodes, num_classes = (int(v) for v in d["config"])
    space = nb201.search_space(C=C, N=N, max_nodes=max_nodes, num_classes=num_classes,
                               op_names=tuple(str(o) for o in d["op_names"]))
    sd = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
    weights, state = space.from_reference(sd)
    x = jnp.asarray(d["x"].transpose(0, 2, 3, 1))
    y = jnp.asarray(d["y"])

    def loss(w, arch):
        logits, new_state = space.apply(w, state, {"cell": jax.nn.softmax(arch, -1)}, x, True)
        ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y])
        return ce, (logits, new_state)

    arch = jnp.asarray(d["arch"])
    (value, (logits, new_state)), (g_w, g_a) = compiled(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                                                        weights, arch)(weights, arch)
    return dict(d=d, space=space, sd=sd, weights=weights, state=state, x=x, loss=value, logits=logits,
                new_state=new_state, g_w=g_w, g_a=g_a)


def test_fixture_logits_loss_and_arch_gradient(ref):
    d = ref["d"]
    assert ref["logits"].dtype == jnp.float64
    assert rel_err(ref["logits"], d["logits"]) < 1e-7
    assert rel_err(ref["loss"], d["loss"]) < 1e-7
    assert rel_err(ref["g_a"], d["grad_arch"]) < 1e-7


def test_fixture_weight_gradients(ref):
    d = ref["d"]
    grads = ref["space"].to_reference(ref["g_w"], ref["state"])
    names = [k[5:] for k in d.files if k.startswith("grad/")]
    floor = 1e-6 * max(float(np.max(np.abs(d["grad/" + n]))) for n in names)
    assert set(names) == {k for k in grads if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    errs = {n: rel_err(grads[n], d["grad/" + n], floor) for n in names}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-7, (worst, errs[worst])


def test_fixture_genotype(ref):
    assert ref["space"].genotype({"cell": ref["d"]["arch"]}) == str(ref["d"]["genotype"])


def test_train_mode_updates_running_statistics_like_torch(ref):
    """Stem BN: running_mean <- 0.9 rm + 0.1 mean, running_var <- 0.9 rv + 0.1 unbiased var."""
    w, x = ref["weights"], ref["x"]
    h = jax.lax.conv_general_dilated(x, w["stem.0"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = np.asarray(h).reshape(-1, h.shape[-1])
    old, new = ref["state"]["stem.1"], ref["new_state"]["stem.1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * h.mean(0), rtol=1e-12)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * h.var(0, ddof=1), rtol=1e-12)
    counts = [v for p, v in jax.tree_util.tree_leaves_with_path(ref["new_state"]) if "num_batches_tracked" in str(p)]
    assert counts and all(int(c) == 1 for c in counts)
    # every tracked BN moved (the search-cell edges included)
    sd_new = ref["space"].to_reference(ref["weights"], ref["new_state"])
    moved = [k for k in sd_new if k.endswith("running_mean") and not np.allclose(sd_new[k], ref["sd"][k])]
    assert len(moved) == sum(k.endswith("running_mean") for k in sd_new)


def test_reference_round_trip_is_exact(ref):
    out = ref["space"].to_reference(ref["weights"], ref["state"])
    assert set(out) == set(ref["sd"])
    for k, v in ref["sd"].items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
        np.testing.assert_array_equal(out[k], v, err_msg=k)
    w2, s2 = ref["space"].from_reference(out)
    for a, b in zip(jax.tree_util.tree_leaves((w2, s2)), jax.tree_util.tree_leaves((ref["weights"], ref["state"]))):
        np.testing.assert_array_equal(a, b)


def test_from_reference_rejects_wrong_dicts(ref):
    sd = dict(ref["sd"])
    sd.pop("stem.0.weight")
    with pytest.raises(ValueError, match="stem.0.weight"):
        ref["space"].from_reference(sd, dtype=np.float64)
    sd = dict(ref["sd"], **{"cells.9.foo": np.zeros(3)})
    with pytest.raises(ValueError, match="unexpected"):
        ref["space"].from_reference(sd)
    sd = dict(ref["sd"])
    sd["classifier.weight"] = sd["classifier.weight"][:, :3]
    with pytest.raises(ValueError, match="classifier.weight"):
        ref["space"].from_reference(sd)


# --- protocol on a tiny supernet -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    space = nb201.search_space(C=2, N=1, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3), jnp.float32)
    return space, x


def test_init_arch_and_init_shapes_vmap(tiny):
    space, x = tiny
    arch = space.init_arch(jax.random.key(1))
    assert arch["cell"].shape == (6, 5) and float(jnp.max(jnp.abs(arch["cell"]))) < 1e-2
    assert space.edge_keys == ("1<-0", "2<-0", "2<-1", "3<-0", "3<-1", "3<-2")
    keys = jax.random.split(jax.random.key(2), 3)
    w, s = jax.jit(jax.vmap(space.init, in_axes=(0, None)))(keys, x)
    kern = w["cells.0"]["edges.1<-0.3"]["op.1"]["kernel"]
    assert kern.shape == (3, 3, 3, 2, 2)  # stacked over keys, HWIO
    assert not np.allclose(kern[0], kern[1])
    assert "op.2" not in w["cells.0"]["edges.1<-0.3"]  # affine=False inside the edge ops
    assert s["cells.0"]["edges.1<-0.3"]["op.2"]["mean"].shape == (3, 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_is_kept(tiny, dtype):
    space, x = tiny
    xs = jax.ShapeDtypeStruct(x.shape, dtype)
    w, s = jax.eval_shape(space.init, jax.random.key(0), xs)
    mix = {"cell": jax.ShapeDtypeStruct((6, 5), jnp.float32)}
    out, new_s = jax.eval_shape(lambda w, s, m, x: space.apply(w, s, m, x, True), w, s, mix, xs)
    assert out.shape == (2, 3) and out.dtype == dtype
    assert jax.tree_util.tree_structure(new_s) == jax.tree_util.tree_structure(s)


def test_eval_mode_uses_running_statistics_and_keeps_state(tiny):
    space, x = tiny
    w, s = space.init(jax.random.key(0), x)
    mix = {"cell": jax.nn.one_hot(jnp.array([1, 0, 3, 2, 4, 1]), 5)}

    def f(w, s, mix, x):
        out, s2 = space.apply(w, s, mix, x, False)
        return out, s2, space.apply(w, s, mix, x[:1], False)[0]

    out, s2, out1 = compiled(f, w, s, mix, x)(w, s, mix, x)
    for a, b in zip(jax.tree_util.tree_leaves(s2), jax.tree_util.tree_leaves(s)):
        np.testing.assert_array_equal(a, b)
    # one image alone gives the same logits in eval mode (no batch statistics involved)
    np.testing.assert_allclose(out1[0], out[0], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(out))


# --- codec ----------------------------------------------------------------------------------

def test_arch_string_codec_round_trip():
    space = nb201.search_space(C=2, N=1)
    ops = nb201.parse_arch_string(BEST)
    assert ops == ("nor_conv_3x3",) * 3 + ("skip_connect", "nor_conv_3x3", "nor_conv_3x3")
    assert nb201.format_arch_string(ops) == BEST
    arch = space.arch_from_genotype(BEST)
    assert arch["cell"].shape == (6, 5) and space.genotype(arch) == BEST
    for i in range(5):
        g = space.random_genotype(jax.random.key(i))
        assert space.genotype(space.arch_from_genotype(g)) == g
    cells = space.all_genotypes()
    assert len(cells) == 15625 == len(set(cells)) == space.num_choices()
    assert BEST in set(cells)
    codec = space.codec()
    assert codec.size == 15625 and codec.decode(codec.encode(BEST)) == BEST


def test_genotype_matches_reference_argmax_rule():
    space = nb201.search_space(C=2, N=1)
    logits = np.zeros((6, 5))
    logits[np.arange(6), [0, 1, 2, 3, 4, 0]] = 1.0
    assert space.genotype({"cell": logits}) == ("|none~0|+|skip_connect~0|nor_conv_1x1~1|+"
                                                "|nor_conv_3x3~0|avg_pool_3x3~1|none~2|")


# --- eval network ---------------------------------------------------------------------------

def _hand_count(arch: str, C: int, N: int, classes: int) -> int:
    ops = nb201.parse_arch_string(arch)
    conv = {"nor_conv_1x1": 1, "nor_conv_3x3": 9}

    def cell(c):  # ReLU-conv (no bias) - affine BN per conv edge
        return sum(c * c * conv[o] + 2 * c for o in ops if o in conv)

    def res(ci, co):  # conv_a, conv_b (+BN), 1x1 shortcut
        return ci * co * 9 + 2 * co + co * co * 9 + 2 * co + ci * co

    return (3 * C * 9 + 2 * C + N * (cell(C) + cell(2 * C) + cell(4 * C)) + res(C, 2 * C) + res(2 * C, 4 * C)
            + 2 * 4 * C + 4 * C * classes + classes)


@pytest.mark.parametrize("arch", [BEST, "|none~0|+|skip_connect~0|avg_pool_3x3~1|+|nor_conv_1x1~0|none~1|skip_connect~2|",
                                  "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"])
def test_eval_network_parameter_count(arch):
    net = nb201.eval_network(arch, C=16, N=5, num_classes=10)
    w, s = jax.eval_shape(net.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert net.num_params(w) == _hand_count(arch, 16, 5, 10)
    if arch.count("nor_conv_3x3") == 6:
        assert net.num_params(w) == 1_531_546  # NAS-Bench-201's largest network, "1.53 MB"


def test_eval_network_runs_and_round_trips():
    arch = "|nor_conv_1x1~0|+|avg_pool_3x3~0|none~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
    net = nb201.eval_network(arch, C=2, N=1, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    w, s = net.init(jax.random.key(1), x)
    out, s2 = compiled(net.apply, w, s, None, x, True, static_argnums=4)(w, s, None, x)
    assert out.shape == (2, 3) and np.all(np.isfinite(out))
    sd = net.to_reference(w, s2)
    assert "cells.0.layers.0.op.1.weight" in sd and sd["cells.0.layers.0.op.1.weight"].shape == (2, 2, 1, 1)
    assert "cells.0.layers.5.op.2.running_var" in sd and "cells.0.layers.1.op.1.weight" not in sd
    assert int(sd["cells.0.layers.0.op.2.num_batches_tracked"]) == 1
    w2, s3 = net.from_reference(sd)
    for k, v in net.to_reference(w2, s3).items():
        np.testing.assert_array_equal(v, sd[k])


# --- bad input ------------------------------------------------------------------------------

def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown op 'conv_9x9'"):
        nb201.search_space(op_names=("none", "conv_9x9"))
    with pytest.raises(ValueError, match="unknown op 'sep_conv_3x3'"):
        nb201.eval_network("|sep_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    with pytest.raises(ValueError, match="node 2.*token"):
        nb201.parse_arch_string("|none~0|+|none~0|none|+|none~0|none~1|none~2|")
    with pytest.raises(ValueError, match="node 1 takes input 1"):
        nb201.eval_network("|none~1|+|none~0|none~1|")
    with pytest.raises(ValueError, match="2 nodes, expected 3"):
        nb201.parse_arch_string("|none~0|+|none~0|none~1|")
    with pytest.raises(ValueError, match="malformed"):
        nb201.parse_arch_string("none~0+none~0")
    space = nb201.search_space(C=2, N=1)
    x = jnp.ones((1, 6, 8, 3))
    with pytest.raises(ValueError, match=r"spatial size \(6, 8\)"):
        space.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="NHWC"):
        space.init(jax.random.key(0), jnp.ones((8, 8, 3)))
    x = jnp.ones((1, 4, 4, 3))
    w, s = space.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"mix.*\(5, 5\).*\(6, 5\)"):
        space.apply(w, s, {"cell": jnp.ones((5, 5))}, x, True)
    with pytest.raises(ValueError, match="structure"):
        space.apply(w, s, {"normal": jnp.ones((6, 5))}, x, True)
    with pytest.raises(ValueError, match="arch"):
        space.genotype({"cell": np.ones((6, 4))})


def test_affine_and_untracked_variants_map_to_reference_names():
    """``affine=True`` edges: bias-free convs with BN weight/bias; ``track_running_stats=False``:
    no running buffers (reference ``nn.BatchNorm2d(affine, track_running_stats)`` state_dicts)."""
    x = jnp.ones((2, 4, 4, 3), jnp.float32)
    sp = nb201.search_space(C=2, N=1, affine=True, track_running_stats=False)
    w, s = sp.init(jax.random.key(0), x)
    sd = sp.to_reference(w, s)
    assert "cells.0.edges.1<-0.3.op.2.weight" in sd and "cells.0.edges.1<-0.3.op.1.bias" not in sd
    assert "cells.0.edges.1<-0.3.op.2.running_mean" not in sd and "stem.1.running_mean" in sd
    w2, s2 = sp.from_reference(sd)
    assert all(np.array_equal(v, sd[k]) for k, v in sp.to_reference(w2, s2).items())
    mix = {"cell": jax.ShapeDtypeStruct((6, 5), jnp.float32)}
    out, s3 = jax.eval_shape(lambda w, s, m: sp.apply(w, s, m, x, False), w, s, mix)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("affine,track,train", [(False, True, True), (False, True, False), (True, False, True)])
def test_search_cell_equals_the_weighted_sum_of_per_edge_ops(affine, track, train):
    # The cell runs each conv op of the edges leaving a node as one wide convolution and BatchNorm,
    # with each edge's mixing weight folded into that BatchNorm's channels: the same function as
    # node_i = sum_j sum_k w[(i, j), k] * op_k(node_j) with one ReLUConvBN per edge (float64:
    # value, running statistics, gradients in weights, mix and input, forward-over-reverse).
    from diffnas_jax.spaces.layers import ReLUConvBN
    C, nodes = 3, 4
    cell = nb201.NB201SearchCell(C, nodes, nb201.NB201_OPS, affine=affine, track_running_stats=track)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, C), jnp.float64)
    keys = nb201.edge_keys(nodes)
    mix = jax.nn.softmax(jax.random.normal(jax.random.key(1), (len(keys), len(nb201.NB201_OPS)), jnp.float64))
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(2), x, mix, train))
    rng = np.random.default_rng(3)
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape) + 1.0, a.dtype)
                               if a.dtype == jnp.float64 else jnp.zeros(a.shape, a.dtype), shapes)
    stats = v.get("batch_stats", {})

    def ours(p, m, x):
        return cell.apply({"params": p, "batch_stats": stats}, x, m, train, mutable=["batch_stats"])

    def per_edge(p, m, x):
        states, new = [x], {}
        for i in range(1, nodes):
            total = 0.0
            for j in range(i):
                e = keys.index(f"{i}<-{j}")
                for k, op in enumerate(nb201.NB201_OPS):
                    name = f"edges.{i}<-{j}.{k}"
                    if op in nb201._CONV_OPS:
                        ksz, pad = nb201._CONV_OPS[op]
                        mod = ReLUConvBN(C, ksz, 1, pad, affine=affine, use_bias=not affine)
                        if track:
                            y, upd = mod.apply({"params": p[name], "batch_stats": stats[name]}, states[j], train,
                                               mutable=["batch_stats"])
                            new[name] = upd["batch_stats"]
                        else:  # batch statistics in both modes, nothing kept
                            y = mod.apply({"params": p[name]}, states[j], True, mutable=["batch_stats"])[0]
                    else:
                        y = nb201._param_free_op(op, states[j])
                        if y is None:
                            continue
                    total = total + m[e, k] * y
            states.append(total)
        return states[-1], {"batch_stats": new}

    (a, na), (b, nb) = ours(v["params"], mix, x), per_edge(v["params"], mix, x)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for name, s in nb["batch_stats"].items():
        for u, t in zip(jax.tree_util.tree_leaves(na["batch_stats"][name]), jax.tree_util.tree_leaves(s)):
            np.testing.assert_allclose(u, t, rtol=1e-12, atol=1e-14)
    loss = lambda f: lambda p, m, x: jnp.sum(jnp.sin(f(p, m, x)[0]) * jnp.cos(x))  # noqa: E731
    direction = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), v["params"])
    assert_same_derivatives(loss(ours), loss(per_edge), (v["params"], mix, x), direction, 1,
                            grad_tol=(1e-10, 1e-11), hvp_tol=(1e-9, 1e-10))
