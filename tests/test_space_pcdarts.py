"""PC-DARTS (partial channels K=4 + edge normalisation) against the authors' code (pcdarts_reference.npz)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture, rel_err
from diffnas_jax.spaces import darts


# XLA's backend optimisation barely changes run time here but halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _ce(logits, y):
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


@pytest.fixture(scope="module")
def ref():
    """The fixture's space, weights, inputs and architecture; no compilation (light tests use it)."""
    d = load_fixture("pcdarts_reference.npz")
    cfg = {str(k): int(v) for k, v in zip(d["config_names"], d["config"])}
    sp = darts.search_space(C=cfg["C"], num_classes=cfg["num_classes"], layers=cfg["layers"], steps=cfg["steps"],
                            multiplier=cfg["multiplier"], stem_multiplier=cfg["stem_multiplier"],
                            partial_channels=cfg["partial_channels_k"], edge_normalization=True)
    sd = {k[3:]: d[k] for k in d.files if k.startswith("sd/")}
    w, s = sp.from_reference(sd)
    arch = {"normal": jnp.asarray(d["alphas_normal"]), "reduce": jnp.asarray(d["alphas_reduce"]),
            "beta": {"normal": jnp.asarray(d["betas_normal"]), "reduce": jnp.asarray(d["betas_reduce"])}}
    return dict(d=d, sp=sp, sd=sd, w=w, s=s, arch=arch)


def test_logits_loss_and_grads_match_reference(ref):
    """Logits, loss, arch (alpha and beta) and weight gradients of one train-mode step. One test:
    the supernet's value-and-grad is the file's only costly compile, and a module fixture holding
    it would be built on every xdist worker that runs one of its tests."""
    d, sp, w, s, arch = ref["d"], ref["sp"], ref["w"], ref["s"], ref["arch"]
    x = jnp.asarray(d["x"].transpose(0, 2, 3, 1))
    y = jnp.asarray(d["y"])

    def loss_fn(w, arch):
        mix = {"normal": jax.nn.softmax(arch["normal"], -1), "reduce": jax.nn.softmax(arch["reduce"], -1),
               "beta": arch["beta"]}
        logits, _ = sp.apply(w, s, mix, x, True)
        return _ce(logits, y), logits

    vg = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)).lower(w, arch).compile(
        compiler_options=FAST_COMPILE)
    (loss, logits), (gw, ga) = vg(w, arch)

    assert rel_err(logits, d["logits"]) < 1e-7, "logits"
    assert rel_err(loss, d["loss"]) < 1e-7, "loss"
    for cell in ("normal", "reduce"):
        assert rel_err(ga[cell], d[f"grad_alphas_{cell}"]) < 1e-7, f"grad alphas_{cell}"
        assert rel_err(ga["beta"][cell], d[f"grad_betas_{cell}"]) < 1e-7, f"grad betas_{cell}"
    gref = {k[5:]: d[k] for k in d.files if k.startswith("grad/")}
    ours = sp.to_reference(gw, s)
    floor = 1e-6 * max(float(np.abs(v).max()) for v in gref.values())
    assert max(rel_err(ours[k], gref[k], floor) for k in gref) < 1e-7, "weight gradients"


def test_genotype(ref):
    g = ref["sp"].genotype(ref["arch"])
    assert [f"{o}:{i}" for o, i in g.normal] == list(ref["d"]["genotype_normal"])
    assert [f"{o}:{i}" for o, i in g.reduce] == list(ref["d"]["genotype_reduce"])


def test_round_trip_and_arch_spec(ref):
    sp = ref["sp"]
    back = sp.to_reference(*sp.from_reference(ref["sd"]))
    assert all(np.array_equal(back[k], v) for k, v in ref["sd"].items()) and set(back) == set(ref["sd"])
    arch = sp.init_arch(jax.random.key(0))
    assert arch["beta"]["normal"].shape == (14,)
    with pytest.raises(ValueError, match="mix"):
        sp.apply(*sp.from_reference(ref["sd"]), {"normal": arch["normal"], "reduce": arch["reduce"]},
                 jnp.zeros((2, 16, 16, 3)), True)


def test_bad_partial_channels():
    with pytest.raises(ValueError, match="partial_channels"):
        darts.search_space(C=6, partial_channels=4)
