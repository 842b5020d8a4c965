"""User-defined search spaces: Choice / InputChoice / WidthChoice, from_module and fix."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax.nn import Choice, InputChoice, WidthChoice
from diffnas_jax.spaces.user import fix, from_module


class SmallNet(nn.Module):
    """A Choice of three convs, a WidthChoice owning a conv, and an InputChoice."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = Choice([nn.Conv(4, (3, 3)), nn.Conv(4, (5, 5)), nn.Conv(4, (1, 1))],
                   names=["conv3", "conv5", "conv1"])(x)
        h = nn.BatchNorm(use_running_average=not train)(h)
        h = jax.nn.relu(h)
        h2 = WidthChoice([2, 4, 8], layer=lambda w: nn.Conv(w, (3, 3)))(h)
        skip = jnp.tile(h.mean(-1, keepdims=True), (1, 1, 1, h2.shape[-1]))
        h2 = InputChoice(2, 1, names=["skip", "conv"])([skip, h2])
        return nn.Dense(3)(h2.mean((1, 2)))


X = jnp.asarray(np.random.RandomState(0).randn(4, 6, 6, 1))
# these tests check values, not speed: XLA's backend optimisations cost ~3x the compile time
# of a search step (implicit step: 60 s -> 20 s under load ~11)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
Y = jnp.asarray([0, 1, 2, 1])


@pytest.fixture(scope="module")
def space():
    return from_module(SmallNet(), X)


def _softmax_mix(arch):
    return jax.tree_util.tree_map(jax.nn.softmax, arch)


def test_choices_discovered_and_arch_separate(space):
    paths = space.choice_paths
    assert paths == ("Choice_0", "InputChoice_0", "WidthChoice_0")
    weights, state = space.init(jax.random.PRNGKey(0), X)
    arch = space.init_arch(jax.random.PRNGKey(1))
    assert "batch_stats" in state
    # architecture logits never live in the weights
    flat = jax.tree_util.tree_leaves_with_path(weights)
    assert not any("alpha" in jax.tree_util.keystr(p) for p, _ in flat)
    assert jax.tree_util.tree_map(jnp.shape, arch) == {
        "Choice_0": {"alpha": (3,)}, "InputChoice_0": {"alpha": (2,)}, "WidthChoice_0": {"alpha": (3,)}}


def test_gradients_reach_every_choice(space):
    weights, state = space.init(jax.random.PRNGKey(0), X)
    arch = space.init_arch(jax.random.PRNGKey(1))

    def loss(a):
        out, _ = space.apply(weights, state, _softmax_mix(a), X, True)
        return jnp.mean(jax.nn.log_softmax(out)[jnp.arange(4), Y])

    g = jax.jit(jax.grad(loss))(arch)
    for leaf in jax.tree_util.tree_leaves(g):
        assert np.all(np.isfinite(leaf)) and np.max(np.abs(leaf)) > 0


def test_mixed_output_is_weighted_sum_of_candidates():
    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Choice([lambda v: 2.0 * v, lambda v: -v, jnp.sin], names=["double", "neg", "sin"])(x)

    x = jnp.linspace(-1.0, 1.0, 5)
    sp = from_module(One(), x)
    w, s = sp.init(jax.random.PRNGKey(0), x)
    mix = {"Choice_0": {"alpha": jnp.array([0.2, 0.3, 0.5])}}
    out, _ = sp.apply(w, s, mix, x, False)
    np.testing.assert_allclose(out, 0.2 * 2 * x - 0.3 * x + 0.5 * jnp.sin(x), rtol=1e-12)


def test_hard_mode_runs_only_the_chosen_candidate():
    calls = []

    def make(i):
        def f(v):
            jax.debug.callback(lambda: calls.append(i))
            return v * (i + 1.0)
        f.__name__ = f"times{i + 1}"
        return f

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Choice([make(0), make(1), make(2)])(x)

    x = jnp.ones((3,))
    sp = from_module(One(), x, hard=True)
    w, s = sp.init(jax.random.PRNGKey(0), x)
    calls.clear()
    mix = {"Choice_0": {"alpha": jnp.array([0.0, 0.0, 1.0])}}
    out, _ = jax.jit(lambda m: sp.apply(w, s, m, x, False))(mix)
    jax.effects_barrier()
    assert calls == [2]
    np.testing.assert_allclose(out, 3.0 * x)
    # straight-through: every mix entry receives a gradient (GDAS form)
    g = jax.grad(lambda m: sp.apply(w, s, m, x, False)[0].sum())(mix)["Choice_0"]["alpha"]
    # chosen entry: d sum(w_k * out) = sum(out) = 9; others: sum of the cotangent = 3
    np.testing.assert_allclose(g, [3.0, 3.0, 9.0])


def test_hard_mode_equals_mixed_mode_on_one_hot(space):
    hard = from_module(SmallNet(), X, hard=True)
    weights, state = space.init(jax.random.PRNGKey(0), X)
    arch = space.init_arch(jax.random.PRNGKey(3))
    onehot = jax.tree_util.tree_map(lambda a: jax.nn.one_hot(jnp.argmax(a), a.shape[-1], dtype=a.dtype), arch)
    out_mixed, st_mixed = space.apply(weights, state, onehot, X, True)
    out_hard, st_hard = jax.jit(lambda m: hard.apply(weights, state, m, X, True))(onehot)
    np.testing.assert_allclose(out_hard, out_mixed, rtol=1e-10, atol=1e-12)


def test_fix_keeps_only_chosen_parameters_and_matches_the_supernet(space):
    weights, state = space.init(jax.random.PRNGKey(0), X)
    genotype = {"Choice_0": "conv5", "InputChoice_0": ("conv",), "WidthChoice_0": 8}
    fixed = space.fix(genotype)
    fw, fs = fixed.init(jax.random.PRNGKey(0), X)
    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(fw))
    # conv5 (5*5*1*4 + 4) + BN (4 + 4) + width conv (3*3*4*8 + 8) + dense (8*3 + 3)
    assert count == (100 + 4) + 8 + (288 + 8) + (24 + 3)
    # the chosen candidates sit at the supernet's parameter paths: inherit and compare
    inherited = jax.tree_util.tree_map(lambda a: a, {k: weights[k] for k in fw})
    arch = space.arch_from_genotype(genotype, scale=1e4)
    out_super, _ = space.apply(weights, state, _softmax_mix(arch), X, False)
    out_fixed, _ = fixed.apply(inherited, {k: state[k] for k in fs}, X, False)
    np.testing.assert_allclose(out_fixed, out_super, rtol=1e-6, atol=1e-8)
    assert space.genotype(arch) == genotype


def test_random_genotype_round_trips(space):
    for seed in range(4):
        g = space.random_genotype(jax.random.PRNGKey(seed))
        assert space.genotype(space.arch_from_genotype(g)) == g
        w, _ = space.fix(g).init(jax.random.PRNGKey(0), X)
        assert jax.tree_util.tree_leaves(w)


def test_errors_name_the_choice(space):
    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Choice([nn.Dense(3), nn.Dense(4)], names=["d3", "d4"])(x)

    with pytest.raises(ValueError, match="Choice_0.*d4"):
        from_module(Bad(), jnp.ones((2, 5)))

    weights, state = space.init(jax.random.PRNGKey(0), X)
    arch = space.init_arch(jax.random.PRNGKey(1))
    bad_mix = _softmax_mix(arch)
    bad_mix["Choice_0"]["alpha"] = jnp.ones((4,)) / 4
    with pytest.raises(ValueError, match="Choice_0"):
        space.apply(weights, state, bad_mix, X, False)
    with pytest.raises(ValueError, match="Choice_0.*conv7"):
        space.arch_from_genotype({"Choice_0": "conv7", "InputChoice_0": ("conv",), "WidthChoice_0": 8})
    with pytest.raises(ValueError, match="Choice_0.*conv7"):
        fix(SmallNet(), {"Choice_0": "conv7", "InputChoice_0": ("conv",), "WidthChoice_0": 8}).init(
            jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match="unknown choice"):
        space.fix({"Nope_0": "x"})
    with pytest.raises(ValueError, match="does not have.*Extra_0"):  # without a space: found when init traces
        fix(SmallNet(), {"Choice_0": "conv3", "InputChoice_0": ("conv",), "WidthChoice_0": 8, "Extra_0": "x"}).init(
            jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match="no Choice"):
        from_module(nn.Dense(3), jnp.ones((2, 5)))


@pytest.mark.parametrize("method", ["darts", "gdas", "implicit"])
def test_user_space_searches_with_library_relaxations_and_estimators(method):
    import optax

    from diffnas_jax import hypergrad, relaxations
    from diffnas_jax.search import init_search_state, make_step

    hard = method == "gdas"
    sp = from_module(SmallNet(), X, hard=hard)
    relax = relaxations.gdas(total_steps=10) if hard else relaxations.softmax()
    est = hypergrad.implicit(solver="cg", maxiter=3, damping=1e-2) if method == "implicit" else hypergrad.first_order()
    w_opt, a_opt = optax.sgd(0.05), optax.adam(0.05)
    step = jax.jit(make_step(sp, relax, est, w_opt, a_opt), compiler_options=FAST_COMPILE)
    state = init_search_state(jax.random.PRNGKey(0), sp, X, w_opt, a_opt, est)
    arch0 = state.arch
    for _ in range(3):
        state, metrics = step(state, (X, Y), (X, Y))
    assert np.isfinite(float(metrics["val_loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(arch0), jax.tree_util.tree_leaves(state.arch)):
        assert np.all(np.isfinite(b)) and np.max(np.abs(a - b)) > 0
    assert set(sp.genotype(state.arch)) == set(sp.choice_paths)
