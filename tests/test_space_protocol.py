"""Every registered space, and a user-defined one, implements the whole SearchSpace protocol.

Cheap: tiny sizes, shapes by ``jax.eval_shape`` (tracing, no compilation)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax import cost
from diffnas_jax.baselines.codec import CategoricalCodec
from diffnas_jax.nn import Choice
from diffnas_jax.spaces import base, registry
from diffnas_jax.spaces.base import CATEGORICAL, PASSTHROUGH, EvalNetwork, SearchSpace

TINY = {"nb201": dict(channels=2, layers=1), "darts": dict(channels=4, layers=3),
        "pcdarts": dict(channels=4, layers=3), "mbconv": dict(widths=(4, 4, 8), strides=(1, 1, 2))}
TINY_EVAL = {"nb201": dict(channels=2, layers=1), "darts": dict(channels=4, layers=3),
             "pcdarts": dict(channels=4, layers=3), "mbconv": dict(widths=(4, 4, 8), strides=(1, 1, 2))}


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x.reshape(x.shape[0], -1))
        h = Choice([nn.Dense(6), lambda v: v, nn.Dense(6, use_bias=False)], names=["dense", "skip", "nobias"])(h)
        return nn.Dense(3)(h)


def _user_space():
    from diffnas_jax.spaces import from_module

    return from_module(_Net(), jnp.zeros((2, 4, 4, 1)))


def _spaces():
    out = [(name, registry.make_space(name, 3, **TINY[name])) for name in registry.list_spaces()]
    return out + [("user", _user_space())]


def test_every_builtin_space_is_registered():
    assert set(registry.list_spaces()) >= {"nb201", "darts", "pcdarts", "mbconv"}
    assert set(TINY) == set(registry.list_spaces())


@pytest.mark.parametrize("name,space", _spaces(), ids=lambda v: v if isinstance(v, str) else "")
def test_space_implements_the_protocol(name, space):
    assert isinstance(space, SearchSpace)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3) if name != "user" else (2, 4, 4, 1), jnp.float32)
    key = jax.random.key(0)
    # arch declaration: kinds mirror the shapes, categorical leaves have a last axis of candidates
    kinds = space.arch_kinds
    assert jax.tree_util.tree_structure(kinds) == jax.tree_util.tree_structure(space.arch_shapes)
    flat = jax.tree_util.tree_leaves_with_path(kinds)
    assert {k for _, k in flat} <= {CATEGORICAL, PASSTHROUGH} and CATEGORICAL in {k for _, k in flat}
    arch = space.init_arch(key)
    base.check_mix_matches(space.arch_shapes, arch, "arch")
    for path, kind in flat:
        if kind == CATEGORICAL:
            names = space.candidate_names(jax.tree_util.keystr(path))
            shape = [s for p, s in jax.tree_util.tree_leaves_with_path(space.arch_shapes) if p == path][0].shape
            assert len(names) == shape[-1] and all(isinstance(n, str) for n in names)
    with pytest.raises(ValueError, match="leaf"):
        space.candidate_names("['no_such_leaf']")
    # network: init and apply by shape only
    w, s = jax.eval_shape(space.init, key, x)
    mix = jax.tree_util.tree_map(lambda a: jnp.full(a.shape, 0.5, a.dtype), space.arch_shapes)
    out, s2 = jax.eval_shape(lambda w, s, m, xx: space.apply(w, s, m, xx, True), w, s, mix, x)
    assert out.shape == (2, 3)
    assert jax.tree_util.tree_structure(s2) == jax.tree_util.tree_structure(s)
    # discrete side: genotype <-> arch, codec, random genotypes
    g = space.random_genotype(jax.random.key(1))
    assert str(space.genotype(space.arch_from_genotype(g))) == str(g)
    codec = space.codec()
    assert isinstance(codec, CategoricalCodec)
    p = codec.random(np.random.default_rng(0))
    assert codec.encode(space.genotype(space.arch_from_genotype(codec.decode(p)))) == p
    assert isinstance(space.topology_groups(), dict)
    # discrete network at a tiny size
    size = {} if name == "user" else dict(TINY_EVAL[name])
    net = (space.eval_network(g) if name == "user"
           else registry.make_eval_network(name, g, 3, **size))
    assert isinstance(net, EvalNetwork)
    wn, sn = jax.eval_shape(net.init, key, jax.ShapeDtypeStruct((2, 32, 32, 3) if name != "user" else x.shape,
                                                                jnp.float32))
    with pytest.raises(ValueError, match="no_such_size"):
        space.eval_network(g, no_such_size=1)
    # cost models
    shape = tuple(x.shape[1:])
    for metric in ("flops", "params"):
        table = space.cost_table(shape, metric)
        assert table.metric == metric
        c = cost.expected_cost(space, space.arch_from_genotype(g), table)
        assert np.isfinite(float(c)) and float(c) > 0
    assert space.network_cost(g, shape).params > 0
    with pytest.raises(ValueError, match="metric"):
        space.cost_table(shape, "latency")


def test_user_space_cost_table_adds_up_exactly():
    space = _user_space()
    for metric in ("flops", "params"):
        table = cost.cost_table(space, None, metric)
        for name in ("dense", "skip", "nobias"):
            g = {space.choices[0].path: name}
            onehot = jax.tree_util.tree_map(lambda a: (a > 0).astype(jnp.float32), space.arch_from_genotype(g))
            exact = getattr(cost.network_cost(space, g), metric)
            assert float(cost.expected_cost(space, onehot, table)) == pytest.approx(exact)
    # by hand: 16*6 + 6*3 MACs plus the chosen candidate's 36
    assert cost.network_cost(space, {space.choices[0].path: "dense"}).flops == 16 * 6 + 36 + 6 * 3


def test_an_argument_a_space_does_not_take_is_an_error():
    with pytest.raises(ValueError, match="partial_channels"):
        registry.make_space("nb201", 10, partial_channels=4)
    with pytest.raises(ValueError, match="channels"):
        registry.make_space("mbconv", 10, channels=8)
    with pytest.raises(ValueError, match="drop_path_prob"):
        registry.make_eval_network("nb201", "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|", 10, drop_path_prob=0.2)
    with pytest.raises(ValueError, match="unknown space 'nope'"):
        registry.make_space("nope", 10)


def test_pcdarts_accepts_c12_k4_as_the_authors_code():
    # only the reduction cells (2C, 4C channels) build FactorizedReduce on C/K channels: 6 and 12
    space = registry.make_space("darts", 10, channels=12, partial_channels=4, edge_normalization=True)
    w, _ = jax.eval_shape(space.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
    assert w["cells.1"]["edges_from_0"]["_ops.3"]["conv_1"]["kernel"].shape[-1] == 3  # FactorizedReduce: 6 / 2
    with pytest.raises(ValueError, match="partial_channels"):
        registry.make_space("darts", 10, channels=6, partial_channels=4)


def test_passthrough_walks_agree():
    arch = {"beta": {"normal": jnp.ones(3)}, "normal": jnp.zeros((3, 2)), "reduce": jnp.ones((3, 2))}
    assert [np.shape(v) for v in base.choice_leaves(arch)] == [(3, 2), (3, 2)]
    doubled = base.map_choices(lambda v: 2 * v, arch)
    np.testing.assert_array_equal(doubled["beta"]["normal"], arch["beta"]["normal"])
    np.testing.assert_array_equal(doubled["reduce"], 2 * arch["reduce"])
    back = base.replace_choice_leaves(arch, [v + 1 for v in base.choice_leaves(arch)])
    np.testing.assert_array_equal(back["normal"], 1 + arch["normal"])
    assert base.strip_passthrough(arch).keys() == {"normal", "reduce"}


def test_genotype_text_and_space_guess_live_in_spaces():
    # the CLI, evaluate and viz ask spaces/ what a genotype is, never hasattr themselves
    from collections import namedtuple

    from diffnas_jax.spaces.genotypes import (DARTS_V2, genotype_text, is_cell_pair, parse_genotype,
                                              space_of_genotype_text)

    ref = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")(*DARTS_V2)  # the reference's own type
    assert is_cell_pair(ref) and not is_cell_pair("|nor_conv_3x3~0|+|")
    assert parse_genotype(genotype_text(ref)) == DARTS_V2
    assert genotype_text("|skip_connect~0|+|") == "|skip_connect~0|+|"
    assert space_of_genotype_text(" |nor_conv_3x3~0|+|none~0|none~1|+|") == "nb201"
    assert space_of_genotype_text(genotype_text(DARTS_V2)) == space_of_genotype_text("DARTS_V2") == "darts"
    with pytest.raises(TypeError, match="text"):
        space_of_genotype_text(DARTS_V2)
