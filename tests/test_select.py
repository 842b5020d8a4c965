"""Selectors on a tiny toy space whose answer is known, plus the real NB201 space when present."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax import select

NAMES = ("none", "identity", "negate")


@dataclasses.dataclass(frozen=True)
class ToySpace:
    """logits = sum_e scale_e * (mix[e, identity] - mix[e, negate]) * x[:, e, :].

    Labels are argmax(sum_e t_e x[:, e, :]): an edge matters in proportion to t_e, and on every
    edge "identity" helps, "negate" hurts and "none" does nothing — so the answer is known.
    ``groups``: a DARTS-like topology rule keeping, per group of rows, the row whose strongest
    non-none softmax weight is largest."""

    n_edges: int = 3
    groups: tuple = ()
    op_names: tuple = NAMES

    def init(self, key, x):
        return {"scale": jnp.ones((self.n_edges,))}, {}

    def candidate_names(self, leaf):
        return self.op_names

    def topology_groups(self):
        return {}

    def init_arch(self, key):
        return {"cell": 1e-3 * jax.random.normal(key, (self.n_edges, 3))}

    def apply(self, weights, state, mix, x, train, *, rng=None):
        m = mix["cell"]
        coef = weights["scale"] * (m[:, 1] - m[:, 2])
        return jnp.einsum("e,bec->bc", coef, x), state

    def genotype(self, arch):
        a = np.asarray(arch["cell"], np.float64)
        a = np.exp(a - a.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        if not self.groups:
            return tuple(NAMES[int(i)] for i in a.argmax(-1))
        out = []
        for g in self.groups:
            best = max(g, key=lambda e: a[e, 1:].max())
            out.append((NAMES[1 + int(a[best, 1:].argmax())], best))
        return tuple(out)


def _data(t, n=256, c=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(t), c))
    y = np.argmax(np.einsum("e,bec->bc", np.asarray(t), x), -1)
    return [(jnp.asarray(x[i:i + 128]), jnp.asarray(y[i:i + 128])) for i in range(0, n, 128)]


def test_argmax_delegates_to_the_space():
    space = ToySpace()
    arch = {"cell": jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])}
    assert select.argmax(space, arch) == ("none", "identity", "negate")
    with pytest.raises(TypeError, match="genotype"):
        select.argmax(object(), arch)


@pytest.mark.parametrize("order", ["largest_effect", "random", "sequential"])
def test_perturbation_finds_what_magnitude_misses(order):
    """'none' has the largest weight on every edge (magnitude picks it), but only masking
    'identity' hurts the supernet: DARTS-PT must pick identity where an edge matters."""
    space = ToySpace()
    arch = {"cell": jnp.tile(jnp.array([[2.0, 1.0, 0.0]]), (3, 1))}
    batches = _data([3.0, 1.0, 0.5])
    assert select.argmax(space, arch) == ("none",) * 3
    weights, state = space.init(None, None)
    res = select.perturbation(space, weights, state, arch, None, batches, key=jax.random.PRNGKey(1),
                              edge_order=order)
    assert res.genotype == ("identity",) * 3
    assert sorted((j, r) for j, r, _ in res.order) == [(0, 0), (0, 1), (0, 2)]
    if order == "largest_effect":
        assert res.order[0][1] == 0  # the edge with t=3 matters most
    assert 0.0 <= res.base_accuracy <= 1.0
    # masking the identity op of the most important edge hurts most
    acc0 = res.op_accuracy[0][0]
    assert np.argmin(acc0) == 1 and acc0[1] < acc0[0]


def test_perturbation_scores_equal_a_python_loop_over_masks():
    space = ToySpace()
    arch = {"cell": jnp.array([[0.3, 1.0, -0.2], [0.1, 0.2, 0.4], [1.0, -1.0, 0.0]])}
    batches = _data([1.0, 2.0, 0.7], seed=3)
    weights, state = space.init(None, None)
    res = select.perturbation(space, weights, state, arch, None, batches, edge_order="sequential",
                              select_topology=False)
    mix = jax.nn.softmax(arch["cell"], -1)
    # the first decision (row 0) was measured on the untouched supernet: recompute by hand
    for op in range(3):
        m = mix.at[0, op].set(0.0)
        correct = sum(int(jnp.sum(jnp.argmax(space.apply(weights, state, {"cell": m}, x, False)[0], -1) == y))
                      for x, y in batches)
        np.testing.assert_allclose(res.op_accuracy[0][0, op], correct / 256.0)
    assert res.edge_accuracy is None


def test_perturbation_topology_uses_the_space_rule():
    """Magnitude keeps edges 1 and 2 (larger logits); DARTS-PT keeps 0 and 3, the ones that matter."""
    space = ToySpace(n_edges=4, groups=((0, 1), (2, 3)))
    arch = {"cell": jnp.array([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0]]),
            "beta": {"cell": jnp.array([5.0, -5.0, 5.0, -5.0])}}
    batches = _data([3.0, 0.05, 0.05, 3.0])
    assert space.genotype(arch) == (("identity", 1), ("identity", 2))
    weights, state = space.init(None, None)
    res = select.perturbation(space, weights, state, arch, None, batches, edge_order="sequential")
    assert res.genotype == (("identity", 0), ("identity", 3))
    assert res.edge_accuracy[0][0] < res.edge_accuracy[0][1]
    np.testing.assert_array_equal(np.asarray(res.arch["beta"]["cell"]), 0.0)


def test_perturbation_calls_finetune_between_decisions():
    space = ToySpace()
    arch = {"cell": jnp.zeros((3, 3))}
    batches = _data([1.0, 1.0, 1.0])
    calls = []

    def finetune(w, s, mix, key):
        calls.append(np.asarray(mix["cell"]))
        return {"scale": w["scale"] * 2.0}, s

    weights, state = space.init(None, None)
    res = select.perturbation(space, weights, state, arch, None, batches, finetune=finetune,
                              edge_order="sequential")
    assert len(calls) == 3
    # the mix handed to the k-th fine-tuning has k one-hot rows
    for k, m in enumerate(calls, start=1):
        assert int(np.sum(np.isclose(m.max(-1), 1.0))) == k
    np.testing.assert_allclose(np.asarray(res.weights["scale"]), 8.0)


def test_perturbation_bad_arguments():
    space = ToySpace()
    arch = space.init_arch(jax.random.PRNGKey(0))
    w, s = space.init(None, None)
    with pytest.raises(ValueError, match="edge_order"):
        select.perturbation(space, w, s, arch, None, _data([1, 1, 1]), edge_order="best")
    with pytest.raises(ValueError, match="batches"):
        select.perturbation(space, w, s, arch, None, [])


def test_sample_matches_the_learned_distribution():
    space = ToySpace(n_edges=1)
    p = np.array([0.7, 0.2, 0.1])
    arch = {"cell": jnp.log(jnp.asarray(p))[None]}
    draws = select.sample(space, arch, jax.random.PRNGKey(0), 3000)
    freq = np.array([sum(g == (n,) for g in draws) for n in NAMES]) / 3000
    np.testing.assert_allclose(freq, p, atol=0.03)
    # temperature -> 0 gives the argmax, large temperature ~ uniform
    cold = select.sample(space, arch, jax.random.PRNGKey(1), 50, temperature=1e-3)
    assert all(g == ("none",) for g in cold)
    hot = select.sample(space, arch, jax.random.PRNGKey(2), 3000, temperature=1e3)
    freq = np.array([sum(g == (n,) for g in hot) for n in NAMES]) / 3000
    np.testing.assert_allclose(freq, 1 / 3, atol=0.04)
    # bfloat16 logits work and give valid genotypes
    bf = select.sample(space, jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), arch),
                       jax.random.PRNGKey(3), 5)
    assert all(g[0] in NAMES for g in bf)


def test_sample_scoring_unique_and_errors():
    space = ToySpace(n_edges=2)
    arch = {"cell": jnp.zeros((2, 3))}
    score = lambda g: float(sum(NAMES.index(n) for n in g))  # noqa: E731
    out = select.sample(space, arch, jax.random.PRNGKey(0), 200, score_fn=score, unique=True)
    assert len(out) == 9  # all 3x3 genotypes appear in 200 uniform draws
    scores = [s for _, s in out]
    assert scores == sorted(scores, reverse=True) and out[0][0] == ("negate", "negate")
    assert select.sample(space, arch, jax.random.PRNGKey(0), 4) == select.sample(space, arch, jax.random.PRNGKey(0), 4)
    with pytest.raises(ValueError, match="temperature"):
        select.sample(space, arch, jax.random.PRNGKey(0), 4, temperature=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        select.sample(space, arch, jax.random.PRNGKey(0), 0)


def test_threshold_decoding():
    space = ToySpace()
    arch = {"cell": jnp.array([[-3.0, 2.5, -3.0], [-3.0, -3.0, -3.0], [-3.0, 1.0, 2.0]])}
    res = select.threshold(space, arch, 0.85)
    # row 1 keeps nothing -> the space's empty candidate; row 2 keeps only negate (sigmoid(1)=0.73)
    assert res.genotype == ("identity", "none", "negate")
    np.testing.assert_array_equal(res.kept[0], [[False, True, False], [False, False, False], [False, False, True]])
    # a lower threshold keeps identity on row 2 as well; the space's argmax decides between them
    assert select.threshold(space, arch, 0.7).kept[0][2].tolist() == [False, True, True]
    # on weights directly
    mix = {"cell": jax.nn.softmax(arch["cell"], -1)}
    assert select.threshold(space, mix, 0.5, activation="identity").genotype[0] == "identity"
    with pytest.raises(ValueError, match="activation"):
        select.threshold(space, arch, 0.5, activation="relu")
    with pytest.raises(ValueError, match="threshold"):
        select.threshold(space, arch, float("nan"))


def test_threshold_without_an_empty_candidate_keeps_the_argmax():
    space = ToySpace(op_names=("a", "b", "c"))
    arch = {"cell": jnp.array([[-3.0, -2.0, -3.0]] * 3)}
    assert select.threshold(space, arch, 0.85).genotype == ("identity",) * 3


# ------------------------------------------------------------------ the real spaces' rules
@dataclasses.dataclass(frozen=True)
class CheapDarts:
    """The real DARTS space's genotype rule (top-2 inputs per node) on a cheap linear supernet:
    logits = sum_e mix["normal"][e, sep_conv_3x3] * t_e * x[:, e, :] (other ops contribute 0),
    so DARTS-PT must pick sep_conv_3x3 and keep, per node, the two edges with the largest t_e."""

    space: object
    t: tuple

    def candidate_names(self, leaf):
        return self.space.candidate_names(leaf)

    def topology_groups(self):
        return {}

    def apply(self, weights, state, mix, x, train, *, rng=None):
        coef = mix["normal"][:, 4] * jnp.asarray(self.t)
        return jnp.einsum("e,bec->bc", coef, x), state

    def genotype(self, arch):
        return self.space.genotype(arch)


def test_perturbation_with_the_darts_top2_rule():
    darts = pytest.importorskip("diffnas_jax.spaces.darts")
    space = darts.search_space(C=4, layers=5)
    # node 1 (edges 2,3,4 from inputs 0,1,2) relies on inputs 0 and 2; node 2 on 1 and 3; node 3 on 0 and 4
    t = [1.0, 1.0, 2.0, 0.01, 2.0, 0.01, 2.0, 0.01, 2.0, 2.0, 0.01, 0.01, 0.01, 2.0]
    cheap = CheapDarts(space, tuple(t))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 14, 6))
    y = np.argmax(np.einsum("e,bec->bc", np.asarray(t), x), -1)
    batches = [(jnp.asarray(x), jnp.asarray(y))]
    # magnitude prefers skip_connect everywhere (the DARTS failure mode)
    arch = {"normal": jnp.tile(jnp.array([[0.0, 0, 0, 2.0, 1.0, 0, 0, 0]]), (14, 1)),
            "reduce": jnp.zeros((14, 8))}
    assert all(op == "skip_connect" for op, _ in space.genotype(arch).normal)
    res = select.perturbation(cheap, {}, {}, arch, None, batches, edge_order="sequential")
    g = res.genotype
    assert all(op == "sep_conv_3x3" for op, _ in g.normal)
    assert [sorted(j for _, j in g.normal[2 * i:2 * i + 2]) for i in range(4)] == [[0, 1], [0, 2], [1, 3], [0, 4]]


def test_sample_and_threshold_on_nb201_and_darts():
    nb201 = pytest.importorskip("diffnas_jax.spaces.nb201")
    darts = pytest.importorskip("diffnas_jax.spaces.darts")
    s = nb201.search_space(C=4, N=1)
    target = "|nor_conv_3x3~0|+|skip_connect~0|avg_pool_3x3~1|+|none~0|nor_conv_1x1~1|skip_connect~2|"
    peaked = s.arch_from_genotype(target, scale=30.0)
    assert select.argmax(s, peaked) == target
    assert set(select.sample(s, peaked, jax.random.PRNGKey(0), 5)) == {target}
    flat = s.arch_from_genotype(target, scale=0.0)
    assert len(set(select.sample(s, flat, jax.random.PRNGKey(0), 20))) > 10
    # threshold: every edge below 0.85 except two -> those keep their op, the rest become none
    logits = np.full((6, 5), -3.0)
    logits[0, 3] = logits[5, 1] = 3.0
    res = select.threshold(s, {"cell": jnp.asarray(logits)}, 0.85)
    assert res.genotype == "|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|"
    d = darts.search_space(C=4, layers=5)
    arch = d.init_arch(jax.random.PRNGKey(0))
    for g in select.sample(d, arch, jax.random.PRNGKey(1), 4):
        assert len(g.normal) == 8 and all(op != "none" for op, _ in g.normal)
        for i in range(4):
            assert len({j for _, j in g.normal[2 * i:2 * i + 2]}) == 2
    assert len(select.threshold(d, arch, 0.5).genotype.reduce) == 8


@dataclasses.dataclass(frozen=True)
class ToyNodes(ToySpace):
    """ToySpace whose groups are declared as nodes keeping one input each."""

    def topology_groups(self):
        return {"cell": [(g, 1) for g in self.groups]}


def test_perturbation_prunes_node_by_node_with_finetuning():
    space = ToyNodes(n_edges=4, groups=((0, 1), (2, 3)))
    arch = {"cell": jnp.array([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0]])}
    batches = _data([3.0, 0.05, 0.05, 3.0])
    calls = []

    def finetune(w, s, mix, key):
        calls.append(np.asarray(mix["cell"]))
        return w, s

    weights, state = space.init(None, None)
    res = select.perturbation(space, weights, state, arch, None, batches, edge_order="sequential",
                              finetune=finetune)
    assert res.genotype == (("identity", 0), ("identity", 3))
    assert [(j, r) for j, r, c in res.order if c is None] == [(0, 1), (0, 2)]
    assert len(calls) == 4 + 2  # after each op decision and after each prune
    np.testing.assert_array_equal(calls[-1][[1, 2]], 0.0)  # pruned edges stay masked


def test_perturbation_node_pruning_with_the_darts_space_groups():
    darts = pytest.importorskip("diffnas_jax.spaces.darts")
    space = darts.search_space(C=4, layers=5)
    assert space.topology_groups()["normal"][3] == ((9, 10, 11, 12, 13), 2)

    class CheapDartsNodes(CheapDarts):
        def topology_groups(self):
            return self.space.topology_groups()

    t = [1.0, 1.0, 2.0, 0.01, 2.0, 0.01, 2.0, 0.01, 2.0, 2.0, 0.01, 0.01, 0.01, 2.0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 14, 6))
    y = np.argmax(np.einsum("e,bec->bc", np.asarray(t), x), -1)
    arch = {"normal": jnp.tile(jnp.array([[0.0, 0, 0, 2.0, 1.0, 0, 0, 0]]), (14, 1)), "reduce": jnp.zeros((14, 8))}
    res = select.perturbation(CheapDartsNodes(space, tuple(t)), {}, {}, arch, None, [(jnp.asarray(x), jnp.asarray(y))],
                              edge_order="sequential")
    g = res.genotype
    assert all(op == "sep_conv_3x3" for op, _ in g.normal)
    assert [sorted(j for _, j in g.normal[2 * i:2 * i + 2]) for i in range(4)] == [[0, 1], [0, 2], [1, 3], [0, 4]]
    assert sum(c is None for _, _, c in res.order) == 2 * (14 - 8)  # 6 prunes per cell type
    with pytest.raises(ValueError, match="topology_groups"):
        class Bad(ToySpace):
            def topology_groups(self):
                return {"cell": [((0, 7), 1)]}
        select.perturbation(Bad(n_edges=3), {"scale": jnp.ones(3)}, {}, {"cell": jnp.zeros((3, 3))}, None,
                            _data([1.0, 1.0, 1.0]))
