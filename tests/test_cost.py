"""Cost models: analytic FLOPs/params against counting the built networks, expected cost,
latency tables."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture

from diffnas_jax import cost
from diffnas_jax.cost import analytic

Genotype = collections.namedtuple("Genotype", "normal normal_concat reduce reduce_concat")
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5])


# ------------------------------------------------------------------ counting tools
def test_count_macs_on_known_layers():
    x = jnp.ones((2, 8, 8, 3))
    k = jnp.ones((3, 3, 3, 5))
    conv = lambda x: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert cost.count_macs(conv, x) == 8 * 8 * 9 * 3 * 5
    kd = jnp.ones((3, 3, 1, 3))
    grouped = lambda x: jax.lax.conv_general_dilated(x, kd, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                     feature_group_count=3)
    assert cost.count_macs(grouped, x) == 4 * 4 * 9 * 3
    w = jnp.ones((3, 7))
    # inside jit, a scan of 4 matmuls, and a cond (largest branch)
    f = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c, c @ w), x, None, length=4)[1])
    assert cost.count_macs(f, x) == 4 * 8 * 8 * 3 * 7
    g = lambda x, p: jax.lax.cond(p, lambda x: x @ w, lambda x: jnp.zeros(x.shape[:-1] + (7,)), x)
    assert cost.count_macs(g, x, True) == 8 * 8 * 3 * 7
    assert cost.count_params({"a": jnp.ones((3, 4)), "b": [jnp.ones(5)]}) == 17


def test_count_macs_sees_the_shifted_multiply_depthwise_conv():
    from diffnas_jax.spaces import layers

    x = jnp.ones((1, 8, 8, 4))
    kern = jnp.ones((3, 3, 1, 4))
    fn = lambda x: layers.depthwise_conv(x, kern, 2, 2, 2)  # noqa: E731
    assert cost.count_macs(fn, x) == analytic.conv(*[analytic.out_size(8, 3, 2, 2, 2)] * 2, 4, 4, 3, groups=4).flops
    assert layers.depthwise_conv is not None and layers.depthwise_conv.__name__ == "depthwise_conv"


# ------------------------------------------------------------------ DARTS
def test_darts_eval_network_params_equal_the_reference_state_dict():
    d = load_fixture("darts_eval_reference.npz")
    C, layers, classes, aux = (int(v) for v in d["config"])
    names = [k for k in d.files if k.startswith("sd/") and "running" not in k and "num_batches" not in k]
    with_aux = sum(d[k].size for k in names)
    no_aux = sum(d[k].size for k in names if "auxiliary" not in k)
    assert cost.darts_network_cost(DARTS_V2, C, layers, classes, auxiliary=True).params == with_aux
    assert cost.darts_network_cost(DARTS_V2, C, layers, classes).params == no_aux


def test_darts_v2_paper_numbers():
    c = cost.darts_network_cost(DARTS_V2)  # C=36, 20 cells, CIFAR-10
    assert c.params == 3_349_342  # the reference count_parameters_in_MB: 3.349342 (paper: 3.3 M)
    assert round(c.flops / 1e6) == 528  # the 528 M multiply-adds reported for DARTS (2nd order)


def test_darts_cost_table_adds_up_to_the_network_cost():
    per, const = cost.darts_cost_table(8, 5, 10, (16, 16, 3), metric="flops")
    offsets = [0, 2, 5, 9]
    prim = analytic.DARTS_PRIMITIVES
    total = const
    for kind, ops in (("normal", DARTS_V2.normal), ("reduce", DARTS_V2.reduce)):
        for n, (op, j) in enumerate(ops):
            total += per[kind][offsets[n // 2] + j, prim.index(op)]
    assert total == cost.darts_network_cost(DARTS_V2, 8, 5, 10, (16, 16, 3)).flops
    assert np.all(per["normal"][:, 0] == 0) and per["reduce"][0, 3] > 0  # stride-2 skip = FactorizedReduce


# ------------------------------------------------------------------ NB201
ARCHS = ("|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|",
         "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|")


@pytest.fixture(scope="module")
def nb201():
    return pytest.importorskip("diffnas_jax.spaces.nb201")


@pytest.mark.parametrize("arch", ARCHS)
def test_nb201_cost_equals_counting_the_built_network(nb201, arch):
    net = nb201.eval_network(arch, C=4, N=1, num_classes=10)
    x = jnp.ones((2, 8, 8, 3), jnp.float32)
    weights, state = jax.eval_shape(lambda k: net.init(k, x), jax.random.PRNGKey(0))
    space = nb201.search_space(C=4, N=1, num_classes=10)
    ours = cost.network_cost(space, arch, (8, 8, 3))
    assert ours.params == cost.count_params(weights)
    assert ours.flops == cost.count_macs(lambda x, w, s: net.apply(w, s, None, x, False)[0], x, weights, state)


def test_xla_cost_analysis_counts_two_flops_per_multiply_add():
    x, w = jnp.ones((8, 3), jnp.float32), jnp.ones((3, 7), jnp.float32)
    assert cost.xla_flops(lambda x, w: x @ w, x, w) == 2 * cost.count_macs(lambda x, w: x @ w, x, w, per_example=False)


def test_nb201_expected_cost_is_linear_and_exact_on_one_hot_mixes(nb201):
    space = nb201.search_space(C=4, N=1, num_classes=10)
    for metric in ("flops", "params"):
        table = cost.cost_table(space, (8, 8, 3), metric)
        for arch in ARCHS:
            mix = space.arch_from_genotype(arch, scale=1.0)  # one-hot
            want = cost.network_cost(space, arch, (8, 8, 3)).get(metric)
            assert float(cost.expected_cost(space, mix, table)) == pytest.approx(want, rel=1e-12)
    # gradient = the table itself; jit works; uniform mix gives the mean over candidates
    mix = jax.nn.softmax(space.init_arch(jax.random.PRNGKey(0))["cell"].astype(jnp.float64), -1)
    g = jax.jit(jax.grad(lambda m: cost.expected_cost(space, {"cell": m}, table)))(mix)
    np.testing.assert_allclose(np.asarray(g), np.asarray(table.per_choice["cell"]))
    with pytest.raises(ValueError, match="mix"):
        cost.expected_cost(space, {"cell": jnp.ones((5, 5))}, table)
    with pytest.raises(ValueError, match="metric"):
        cost.cost_table(space, (8, 8, 3), "latency")


def test_latency_table_profile_save_load(nb201, tmp_path):
    space = nb201.search_space(C=2, N=1, num_classes=10, op_names=("none", "nor_conv_3x3"))
    table = cost.profile_latency(space, (8, 8, 3), repeats=2, warmup=1)
    assert table.metric == "latency" and table.unit == "ms"
    per = np.asarray(table.per_choice["cell"])
    assert per.shape == (6, 2) and np.all(per > 0) and table.constant > 0
    assert table.meta["device"].startswith("cpu") and "nor_conv_3x3@8x8x2" in table.meta["entries"]
    path = tmp_path / "lat.json"
    cost.save_table(table, path)
    back = cost.load_table(path)
    np.testing.assert_array_equal(np.asarray(back.per_choice["cell"]), per)
    assert back.constant == table.constant and back.meta == table.meta
    assert cost.compare_tables(back, table)["median"] == 1.0
    mix = {"cell": jnp.full((6, 2), 1 / 2)}
    lat = cost.expected_latency(mix, back)
    assert float(lat) == pytest.approx(table.constant + per.sum() / 2)
    g = jax.grad(lambda m: cost.expected_latency(m, back))(mix)
    np.testing.assert_allclose(np.asarray(g["cell"]), per)
    with pytest.raises(ValueError, match="latency"):
        cost.expected_latency(mix, cost.cost_table(space, (8, 8, 3)))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="cost table"):
        cost.load_table(bad)
    with pytest.raises(ValueError, match="profiler"):
        cost.profile_latency(object(), (8, 8, 3))


def test_latency_profiler_comes_from_the_registry_entry():
    # a space without one is refused by name; giving its entry a profiler makes it profilable
    # (and offered by `diffnas profile`) without touching diffnas_jax.cost
    import dataclasses

    from diffnas_jax.cli import build_parser
    from diffnas_jax.spaces import registry

    darts = registry.make_space("darts", 10, channels=4, layers=3)
    with pytest.raises(ValueError, match="space 'darts' has no latency profiler"):
        cost.profile_latency(darts, (8, 8, 3))
    assert "darts" not in registry.spaces_with_latency_profiler()
    with pytest.raises(SystemExit):  # the CLI offers only spaces with a profiler
        build_parser().parse_args(["profile", "--space", "darts"])
    assert {"nb201", "mbconv"} <= set(registry.spaces_with_latency_profiler())
    seen = []

    def fake(space, input_shape, batch_size, repeats, warmup, dtype):
        seen.append((space, input_shape, batch_size))
        per = {k: np.full(v.shape, 0.5) for k, v in space.arch_shapes.items()}
        return per, 1.25, {"fixed": 1.25}

    entry = registry.get_space("darts")
    registry.register_space(dataclasses.replace(entry, latency_profiler=fake), overwrite=True)
    try:
        assert "darts" in registry.spaces_with_latency_profiler()
        assert build_parser().parse_args(["profile", "--space", "darts"]).space == "darts"
        table = cost.profile_latency(darts, (8, 8, 3), repeats=1, warmup=1, batch_size=2)
        assert seen == [(darts, (8, 8, 3), 2)]
        assert table.constant == 1.25 and table.meta["space"] == "darts" and table.unit == "ms"
    finally:
        registry.register_space(entry, overwrite=True)
    with pytest.warns(DeprecationWarning, match="latency_profiler"):  # the old entry point sets the field
        cost.register_latency_profiler("darts", fake)
    try:
        assert registry.get_space("darts").latency_profiler is fake
    finally:
        registry.register_space(entry, overwrite=True)
    assert registry.get_space("darts").latency_profiler is None


def test_darts_cost_equals_counting_the_built_eval_network():
    darts = pytest.importorskip("diffnas_jax.spaces.darts")
    x = jnp.ones((2, 16, 16, 3), jnp.float32)
    # tracing the network dominates the cost: one genotype, three cells (two of them reductions)
    for g in (DARTS_V2,):
        net = darts.eval_network(g, C=4, num_classes=10, layers=3, auxiliary=False, drop_path_prob=0.0)
        weights, state = jax.eval_shape(lambda k: net.init(k, x), jax.random.PRNGKey(0))
        ours = cost.darts_network_cost(g, 4, 3, 10, (16, 16, 3))
        assert ours.params == cost.count_params(weights)
        assert ours.flops == cost.count_macs(lambda x, w, s: net.apply(w, s, None, x, False)[0], x, weights, state)
        space = darts.search_space(C=4, layers=3)
        assert cost.network_cost(space, g, (16, 16, 3)) == ours


# ------------------------------------------------------------------ MBConv
def _tiny_mbconv():
    mbconv = pytest.importorskip("diffnas_jax.spaces.mbconv")
    return mbconv.search_space(widths=(8, 8, 16), strides=(1, 2, 1), kernel_sizes=(3, 5), expansions=(3,),
                               stem_width=8, first_width=8, head_width=16)


def test_mbconv_cost_equals_counting_the_built_network():
    space = _tiny_mbconv()
    x = jnp.ones((2, 16, 16, 3), jnp.float32)
    for g in (space.random_genotype(jax.random.PRNGKey(0)), space.random_genotype(jax.random.PRNGKey(5))):
        net = space.eval_network(g)
        weights, state = jax.eval_shape(lambda k: net.init(k, x), jax.random.PRNGKey(0))
        ours = cost.network_cost(space, g, (16, 16, 3))
        assert ours.params == cost.count_params(weights)
        assert ours.flops == cost.count_macs(lambda x, w, s: net.apply(w, s, None, x, False)[0], x, weights, state)
        # the expected cost of the one-hot mix of g is the network's cost
        names = space.op_names
        onehot = {"layers": jnp.asarray(np.eye(len(names))[[names.index(op) for op in g]])}
        for metric in ("flops", "params"):
            table = cost.cost_table(space, (16, 16, 3), metric)
            assert float(cost.expected_cost(space, onehot, table)) == ours.get(metric)


def test_mbconv_latency_table():
    space = _tiny_mbconv()
    table = cost.profile_latency(space, (16, 16, 3), repeats=2, warmup=1)
    per = np.asarray(table.per_choice["layers"])
    assert per.shape == (3, len(space.op_names))
    np.testing.assert_array_equal(per > 0, np.asarray(space.op_mask))  # masked candidates cost nothing
    assert table.constant >= 0 and table.meta["space"] == "mbconv"
