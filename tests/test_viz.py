"""The plotting helpers return Figures, write PNGs headless and never touch the caller's backend."""
from __future__ import annotations

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402

from diffnas_jax import viz  # noqa: E402
from diffnas_jax.spaces.genotypes import DARTS_V2  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
NB201 = "|nor_conv_3x3~0|+|skip_connect~0|avg_pool_3x3~1|+|none~0|nor_conv_1x1~1|skip_connect~2|"


@pytest.fixture
def svg_backend():
    """A non-Agg backend that works without a display, restored afterwards."""
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    figs = plt.get_fignums()
    yield plt, figs
    matplotlib.use(before)


def _history(T=5, edges=6, ops=5, seed=0):
    logits = np.random.default_rng(seed).normal(size=(T, edges, ops)).cumsum(0)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return list(range(0, 10 * T, 10)), {"cell": e / e.sum(-1, keepdims=True)}


@pytest.mark.parametrize("genotype", [NB201, DARTS_V2, ["mb3_e3", "skip", "mb5_e6"], {"k0": "c3", "w0": "16"}],
                         ids=["nb201", "darts", "chain", "dict"])
def test_plot_genotype_returns_figure_and_keeps_backend(genotype, svg_backend, tmp_path):
    plt, figs = svg_backend
    fig = viz.plot_genotype(genotype, tmp_path / "cell.png", title="t")
    assert isinstance(fig, Figure)
    assert matplotlib.get_backend() == "svg"
    assert plt.get_fignums() == figs  # nothing registered with pyplot's global state
    assert (tmp_path / "cell.png").read_bytes()[:8] == PNG
    assert isinstance(viz.plot_genotype(genotype), Figure)  # drawing without a file is allowed


def test_plot_arch_history_fixed_unit_scale_with_uniform_level(svg_backend, tmp_path):
    plt, figs = svg_backend
    steps, hist = _history()
    fig = viz.plot_arch_history(steps, hist, tmp_path / "w.png", op_names=list("abcde"))
    assert isinstance(fig, Figure)
    assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figs
    assert (tmp_path / "w.png").read_bytes()[:8] == PNG
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 6
    for ax in panels:
        assert ax.get_ylim() == (0.0, 1.0)
        uniform = [ln for ln in ax.lines if ln.get_label().startswith("uniform")]
        assert len(uniform) == 1 and np.allclose(uniform[0].get_ydata(), 0.2)


def test_plot_arch_history_uniform_level_follows_num_ops(tmp_path):
    steps, hist = _history(edges=1, ops=8)
    fig = viz.plot_arch_history(steps, {"a": hist["cell"][:, 0]})  # (T, ops) leaves are one edge
    (ax,) = [ax for ax in fig.axes if ax.lines]
    (uniform,) = [ln for ln in ax.lines if ln.get_label().startswith("uniform")]
    assert np.allclose(uniform.get_ydata(), 1 / 8) and ax.get_ylim() == (0.0, 1.0)


def test_plot_arch_history_takes_labels_from_the_space():
    # panels named by the space's choice labels (NB201 edges "1<-0"), legends by its candidates
    from diffnas_jax.spaces import registry

    space = registry.make_space("nb201", 10, channels=2, layers=1)
    steps, hist = _history()
    fig = viz.plot_arch_history(steps, hist, space=space)
    titles = [ax.get_title() for ax in fig.axes if ax.lines]
    assert titles == ["1<-0", "2<-0", "2<-1", "3<-0", "3<-1", "3<-2"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:5] == list(space.op_names)
    # explicit names still win
    fig = viz.plot_arch_history(steps, hist, space=space, edge_names={"cell": list("abcdef")})
    assert [ax.get_title() for ax in fig.axes if ax.lines] == list("abcdef")


def test_choice_labels_of_every_registered_space_match_the_rows():
    import math

    import jax

    from diffnas_jax.spaces import base, registry

    tiny = {"nb201": dict(channels=2, layers=1), "darts": dict(channels=4, layers=3),
            "pcdarts": dict(channels=4, layers=3), "mbconv": {}}
    for name in registry.list_spaces():
        space = registry.make_space(name, 10, **tiny.get(name, {}))
        labels = base.arch_labels(space)
        shapes = {base.leaf_name(p): s.shape for p, s in jax.tree_util.tree_leaves_with_path(space.arch_shapes)}
        assert labels, name
        for leaf, (rows, ops) in labels.items():
            assert len(rows) == math.prod(shapes[leaf][:-1]) and len(set(rows)) == len(rows), (name, leaf)
            assert len(ops) == shapes[leaf][-1], (name, leaf)
    darts = registry.make_space("darts", 10, **tiny["darts"])
    assert base.choice_labels(darts, "['normal']")[:5] == ("0<-c_{k-2}", "0<-c_{k-1}", "1<-c_{k-2}", "1<-c_{k-1}",
                                                            "1<-0")
    assert base.choice_labels(registry.make_space("mbconv", 10), "['layers']")[0] == "layers[0]"
    with pytest.raises(ValueError, match="leaf"):
        base.choice_labels(darts, "['cell']")
    # a space without the optional member gets indexed labels
    import types

    bare = types.SimpleNamespace(arch_shapes={"a": jax.ShapeDtypeStruct((2, 3, 4), np.float32),
                                              "b": jax.ShapeDtypeStruct((5,), np.float32)})
    assert base.choice_labels(bare, "['a']") == ("a[0,0]", "a[0,1]", "a[0,2]", "a[1,0]", "a[1,1]", "a[1,2]")
    assert base.choice_labels(bare, "['b']") == ("b",)


def test_plot_errors_name_the_argument():
    with pytest.raises(ValueError, match="history"):
        viz.plot_arch_history([0, 1], {"cell": np.zeros((3, 2, 2))})
    with pytest.raises(ValueError, match="history"):
        viz.plot_arch_history([0], {})
    with pytest.raises(TypeError, match="genotype"):
        viz.plot_genotype(3.5)
