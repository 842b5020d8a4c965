"""MBConv layer-wise space: protocol (jit, vmap of init, grads), the fused supernet equals the
discrete network with inherited weights, cost metadata, codec and bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax.spaces import mbconv

# Test-only: XLA backend optimisation level 0 halves compile time (one call per program here).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
SMALL = dict(widths=(8, 8, 16), strides=(1, 1, 2), kernel_sizes=(3, 5), expansions=(2, 3), stem_width=4,
             first_width=4, head_width=16, num_classes=3)


@pytest.fixture(scope="module")
def small():
    space = mbconv.search_space(**SMALL)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3), jnp.float32)
    w, s = space.init(jax.random.key(1), x)

    def loss_and_grad(w, s, a):
        def loss(w, a):
            out, ns = space.apply(w, s, {"layers": jax.nn.softmax(a, -1)}, x, True)
            return jnp.sum(out ** 2), (out, ns)
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, a)

    a0 = space.init_arch(jax.random.key(2))["layers"]
    fn = jax.jit(loss_and_grad).lower(w, s, a0).compile(compiler_options=FAST_COMPILE)
    return space, x, w, s, fn


def test_ops_mask_and_arch(small):
    space = small[0]
    assert space.op_names == ("mbconv_k3_e2", "mbconv_k3_e3", "mbconv_k5_e2", "mbconv_k5_e3", "skip")
    assert space.skip_allowed == (False, True, False)  # 4->8 channels, 8->8 stride 1, stride 2
    arch = space.init_arch(jax.random.key(0))
    assert arch["layers"].shape == (3, 5)
    assert np.all(np.asarray(arch["layers"])[[0, 2], 4] == mbconv.MASKED_LOGIT)
    assert np.all(np.abs(np.asarray(arch["layers"])[space.op_mask]) < 1e-2)
    default = mbconv.search_space()
    assert len(default.op_names) == 7 and default.num_layers == 6
    assert default.skip_allowed == (False, True, False, True, False, True)


def test_grads_finite_and_state_updated(small):
    space, x, w, s, fn = small
    arch = space.init_arch(jax.random.key(2))["layers"]
    (val, (out, ns)), (gw, ga) = fn(w, s, arch)
    assert out.shape == (3, 3) and out.dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves((gw, ga)))
    ga = np.asarray(ga)
    assert np.all(ga[[0, 2], 4] == 0.0) or np.all(np.abs(ga[[0, 2], 4]) < 1e-10)  # masked skip: no signal
    assert np.all(np.abs(ga[:, :4]) > 0)
    assert float(jnp.max(jnp.abs(gw["layers_2"]["mbconv_k3_e2"]["dw"]["kernel"]))) > 0
    cnt = ns["layers_0"]["mbconv_k5_e3"]["project_bn"]["num_batches_tracked"]
    assert int(cnt) == 1
    assert not np.allclose(ns["layers_0"]["mbconv_k5_e3"]["dw_bn"]["mean"], s["layers_0"]["mbconv_k5_e3"]["dw_bn"]["mean"])


@pytest.mark.parametrize("genotype", [["mbconv_k3_e3", "skip", "mbconv_k5_e2"]])
def test_supernet_one_hot_equals_discrete_network(small, genotype):
    """All candidates run fused (concatenated kernels, small depthwise kernels zero-padded to
    the largest, one BN over all channels); with a one-hot mix this must equal the discrete
    network with the inherited weights, BN state included."""
    space, x, w, s, fn = small
    arch = space.arch_from_genotype(genotype, scale=1e4)["layers"]  # softmax is exactly one-hot
    (_, (out_super, ns_super)), _ = fn(w, s, arch)
    net = space.eval_network(genotype)
    wi, si = space.inherit(w, s, genotype)
    out_net, ns_net = jax.jit(net.apply, static_argnums=4).lower(wi, si, None, x, True).compile(
        compiler_options=FAST_COMPILE)(wi, si, None, x)
    np.testing.assert_allclose(out_net, out_super, rtol=2e-5, atol=2e-6)
    _, ns_pick = space.inherit(w, ns_super, genotype)
    for a, b in zip(jax.tree_util.tree_leaves(ns_net), jax.tree_util.tree_leaves(ns_pick)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    w2, _ = net.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(w2) == jax.tree_util.tree_structure(wi)


def test_init_vmaps_over_keys(small):
    space, x = small[0], small[1]
    w, s = jax.jit(jax.vmap(space.init, in_axes=(0, None)))(jax.random.split(jax.random.key(3), 2), x)
    k = w["layers_1"]["mbconv_k5_e3"]["dw"]["kernel"]
    assert k.shape == (2, 5, 5, 1, 24) and not np.allclose(k[0], k[1])
    assert float(jnp.max(jnp.abs(k))) <= 1 / 5  # PyTorch default bound 1/sqrt(fan_in), fan_in = 25
    assert s["layers_1"]["mbconv_k5_e3"]["dw_bn"]["var"].shape == (2, 24)


def test_dtype_kept_bfloat16(small):
    space = small[0]
    xs = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.bfloat16)
    w, s = jax.eval_shape(space.init, jax.random.key(0), xs)
    mix = {"layers": jax.ShapeDtypeStruct((3, 5), jnp.float32)}
    out, _ = jax.eval_shape(lambda w, s, m, x: space.apply(w, s, m, x, False), w, s, mix, xs)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 3)


def test_genotype_codec_round_trip(small):
    space = small[0]
    for i in range(6):
        g = space.random_genotype(jax.random.key(i))
        assert g[0] != "skip" and g[2] != "skip"
        assert space.genotype(space.arch_from_genotype(g)) == g
    a = np.zeros((3, 5), np.float32)
    a[:, 4] = 5.0  # skip strongest everywhere: only layer 1 may take it
    g = space.genotype({"layers": a})
    assert g[1] == "skip" and g[0] != "skip" and g[2] != "skip"
    codec = space.codec()
    assert codec.cardinalities == (4, 5, 4) and space.num_choices() == 80
    assert codec.decode(codec.encode(g)) == g


def test_cost_metadata_matches_network_and_hand_count(small):
    space = small[0]
    g = ["mbconv_k5_e3", "skip", "mbconv_k3_e2"]
    net = space.eval_network(g)
    w, _ = jax.eval_shape(net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    cost = space.count_flops_params(g, (8, 8, 3))
    assert cost["params"] == net.num_params(w)
    # by hand: stem 8*8*3*9*4, first dw 8*8*4*9 + pw 8*8*4*4, layer0 (4->8, k5 e3, hidden 12):
    # 8*8*4*12 + 8*8*12*25 + 8*8*12*8, layer2 (8->16, s2, k3 e2, hidden 16): 8*8*8*16 + 4*4*16*9 +
    # 4*4*16*16, head 4*4*16*16, classifier 16*3
    hand = (8 * 8 * 3 * 9 * 4 + 8 * 8 * 4 * 9 + 8 * 8 * 4 * 4 + 8 * 8 * 4 * 12 + 8 * 8 * 12 * 25 + 8 * 8 * 12 * 8
            + 8 * 8 * 8 * 16 + 4 * 4 * 16 * 9 + 4 * 4 * 16 * 16 + 4 * 4 * 16 * 16 + 16 * 3)
    assert cost["flops"] == hand
    specs = space.layer_specs((8, 8, 3))
    assert [s["in_shape"] for s in specs] == [(8, 8, 4), (8, 8, 8), (8, 8, 8)]
    assert specs[2]["out_shape"] == (4, 4, 16) and specs[2]["stride"] == 2
    c = specs[0]["candidates"][3]
    assert (c["op"], c["kernel"], c["expansion"], c["allowed"]) == ("mbconv_k5_e3", 5, 3, True)
    table = space.layer_cost_arrays((8, 8, 3))
    onehot = np.asarray(jax.nn.one_hot(jnp.array([space.op_names.index(o) for o in g]), 5))
    assert table["base_flops"] + np.sum(onehot * table["flops"]) == hand
    assert table["base_params"] + np.sum(onehot * table["params"]) == cost["params"]
    assert table["flops"][0, 4] == 0 and table["flops"][1, 4] == 0


def test_bad_inputs(small):
    space, x, w, s, _ = small
    with pytest.raises(ValueError, match="unknown op 'mbconv_k9_e1'"):
        space.arch_from_genotype(["mbconv_k9_e1", "skip", "mbconv_k3_e2"])
    with pytest.raises(ValueError, match=r"genotype\[0\].*skip is not allowed in layer 0"):
        space.eval_network(["skip", "skip", "mbconv_k3_e2"])
    with pytest.raises(ValueError, match="2 ops.*3 searchable"):
        space.count_flops_params(["skip", "skip"])
    with pytest.raises(ValueError, match=r"mix.*\(3, 4\).*\(3, 5\)"):
        space.apply(w, s, {"layers": jnp.ones((3, 4))}, x, True)
    with pytest.raises(ValueError, match="total stride 2"):
        space.init(jax.random.key(0), jnp.ones((1, 1, 8, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        space.init(jax.random.key(0), jnp.ones((8, 8, 3)))
    with pytest.raises(ValueError, match="odd"):
        mbconv.search_space(kernel_sizes=(3, 4))
    with pytest.raises(ValueError, match="same length"):
        mbconv.search_space(widths=(8, 8), strides=(1,))
    with pytest.raises(NotImplementedError, match="no reference"):
        space.from_reference({})
