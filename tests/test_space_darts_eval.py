"""DARTS evaluation network (NetworkCIFAR) against the reference (fixture darts_eval_reference.npz)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture, rel_err
from diffnas_jax.spaces import darts
from diffnas_jax.spaces.genotypes import (DARTS_V2, GENOTYPES, Genotype, format_genotype, parse_genotype)


# XLA's backend optimisation barely changes run time here but halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _ce(logits, y):
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


@pytest.fixture(scope="module")
def ref():
    """The fixture's network, weights and genotype; no compilation (light tests use it)."""
    d = load_fixture("darts_eval_reference.npz")
    C, layers, ncls, aux = (int(v) for v in d["config"])
    g = parse_genotype(str(d["genotype"]))
    net = darts.eval_network(g, C=C, num_classes=ncls, layers=layers, auxiliary=bool(aux), drop_path_prob=0.0)
    sd = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
    w, s = net.from_reference(sd)
    return dict(d=d, net=net, sd=sd, w=w, s=s, genotype=g)


def test_outputs_and_grads_match_reference(ref):
    """Train-mode logits (main and auxiliary head), loss and weight gradients, and eval-mode
    logits. One test: a module fixture holding the compiled programs would be built on every
    xdist worker that runs one of its tests."""
    d, net, w, s = ref["d"], ref["net"], ref["w"], ref["s"]
    x = jnp.asarray(d["x"].transpose(0, 2, 3, 1))
    y = jnp.asarray(d["y"])

    def loss_fn(w):
        (logits, aux_logits), _ = net.apply(w, s, None, x, True)
        return _ce(logits, y) + 0.4 * _ce(aux_logits, y), (logits, aux_logits)

    vg = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(w).compile(compiler_options=FAST_COMPILE)
    (loss, (logits, aux_logits)), gw = vg(w)
    logits_eval, _ = jax.jit(lambda w, s, x: net.apply(w, s, None, x, False))(w, s, x)
    assert rel_err(logits, d["logits_train"]) < 1e-7, "train logits"
    assert rel_err(aux_logits, d["logits_aux_train"]) < 1e-7, "auxiliary logits"
    assert rel_err(loss, d["loss_train"]) < 1e-7, "loss"
    assert rel_err(logits_eval, d["logits_eval"]) < 1e-7, "eval logits"

    gref = {k[5:]: d[k] for k in d.files if k.startswith("grad/")}
    ours = net.to_reference(gw, s)
    floor = 1e-6 * max(float(np.abs(v).max()) for v in gref.values())
    assert max(rel_err(ours[k], gref[k], floor) for k in gref) < 1e-7, "weight gradients"


def test_round_trip_exact(ref):
    back = ref["net"].to_reference(*ref["net"].from_reference(ref["sd"]))
    assert set(back) == set(ref["sd"])
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in ref["sd"].items())


def test_genotype_text_round_trip(ref):
    assert ref["genotype"] == DARTS_V2
    text = format_genotype(DARTS_V2)
    assert text == str(ref["d"]["genotype"])
    for g in GENOTYPES.values():
        assert parse_genotype(format_genotype(g)) == Genotype(
            [tuple(p) for p in g.normal], g.normal_concat, [tuple(p) for p in g.reduce], g.reduce_concat)


def test_parameter_count_darts_v2():
    net = darts.eval_network("DARTS_V2", C=36, num_classes=10, layers=20, auxiliary=True)
    shapes = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1, 32, 32, 3), jnp.float32)), jax.random.key(0))
    w = shapes[0]
    assert net.num_params(w, auxiliary=False) == 3_349_342
    assert net.num_params(w, auxiliary=True) == 3_825_768


@pytest.mark.parametrize("name", ["NASNet", "AmoebaNet", "DARTS_V1", "DARTS_V2", "PC_DARTS", "PDARTS", "GDAS"])
def test_builtin_genotypes_build(name):
    net = darts.eval_network(name, C=4, num_classes=3, layers=3, auxiliary=False)
    w, s = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1, 32, 32, 3), jnp.float32)), jax.random.key(0))
    assert w["classifier"]["kernel"].shape[1] == 3
    out = jax.eval_shape(lambda w, s: net.apply(w, s, None, jnp.zeros((2, 32, 32, 3)), False), w, s)
    assert out[0].shape == (2, 3)


def test_drop_path_needs_rng_and_is_random():
    net = darts.eval_network("DARTS_V2", C=4, num_classes=3, layers=3, auxiliary=False, drop_path_prob=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    w, s = net.init(jax.random.key(1), x)
    with pytest.raises(ValueError, match="rng"):
        net.apply(w, s, None, x, True)
    f = jax.jit(lambda r: net.apply(w, s, None, x, True, rng=r)[0])
    a, b = f(jax.random.key(2)), f(jax.random.key(3))
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)


def test_bad_genotypes():
    with pytest.raises(ValueError, match="input index"):
        parse_genotype("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 2)], normal_concat=[2], "
                       "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])")
    with pytest.raises(ValueError, match="unknown op"):
        darts.eval_network(Genotype([("conv_9x9", 0), ("skip_connect", 1)], [2],
                                    [("skip_connect", 0), ("skip_connect", 1)], [2]))
    with pytest.raises(ValueError):
        parse_genotype("Genotype(normal=__import__('os').system('true'), normal_concat=[2], reduce=[], reduce_concat=[2])")
    with pytest.raises(ValueError, match="auxiliary"):
        darts.eval_network("DARTS_V2", C=4, layers=3).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
