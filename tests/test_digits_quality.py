"""benchmarks/digits_quality.py: the decision statistics of mixing weights and the criterion."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_script

dq = load_script(ROOT / "benchmarks" / "digits_quality.py", "digits_quality")


def _seed(probs, genotype="|none~0|+|skip_connect~0|avg_pool_3x3~1|+|nor_conv_3x3~0|none~1|nor_conv_1x1~2|"):
    return {"seed": 7, "genotype": genotype, "mix": {"cell": np.asarray(probs).tolist()},
            "final_metrics": {"val_acc": 0.5}}


def test_seed_row_uses_the_library_decision_statistics():
    # the benchmark's per-seed figures are search.decision.edge_decisions of the logged mix
    from diffnas_jax.search.decision import edge_decisions

    rng = np.random.default_rng(0)
    p = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(6, 5)) * 2), axis=-1), np.float64)
    row = dq.seed_row(_seed(p))
    ref = edge_decisions(p)
    np.testing.assert_allclose(row["margin"], ref["margin"])
    np.testing.assert_allclose(row["entropy"], ref["entropy"])
    srt = np.sort(p, -1)
    np.testing.assert_allclose(row["margin"], srt[:, -1] - srt[:, -2], atol=1e-6)
    assert row["decided"] == dq.decided(row["margin"]) and row["seed"] == 7
    assert row["param_free_ops"] == 4 and row["supernet_val_acc"] == 0.5


def test_seed_row_extremes_and_divergence():
    uniform = dq.seed_row(_seed(np.full((6, 5), 0.2)))
    np.testing.assert_allclose(uniform["entropy"], 1.0)  # normalised: 1 = uniform
    assert uniform["mean_margin"] == 0.0 and not uniform["decided"]
    one_hot = dq.seed_row(_seed(np.eye(5)[[0, 1, 2, 3, 4, 0]]))
    np.testing.assert_array_equal(one_hot["entropy"], 0.0)  # 0 log 0 = 0, not NaN
    assert one_hot["min_margin"] == 1.0 and one_hot["decided"]
    bad = np.full((6, 5), 0.2)
    bad[2, 1] = np.nan
    with pytest.raises(FloatingPointError, match="seed 7"):
        dq.seed_row(_seed(bad))


def test_decided_criterion():
    assert dq.decided([0.2, 0.1, 0.06, 0.3, 0.15, 0.1])
    assert not dq.decided([0.5, 0.5, 0.5, 0.5, 0.5, 0.04])  # one undecided edge
    assert not dq.decided([0.06] * 6)  # every edge above the floor, mean too low
    assert not dq.decided([0.5, np.nan])
    assert not dq.decided([])


def test_preset_parse():
    assert dq.Preset.parse("1e-2:25") == dq.Preset(1e-2, 25, 0, 64)
    assert dq.Preset.parse("3e-3:40:10:32") == dq.Preset(3e-3, 40, 10, 32)
    with pytest.raises(Exception, match="arch_lr"):
        dq.Preset.parse("1e-2")


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    # one 2-epoch search and three 2-epoch trainings (minutes on a 2-core CPU)
    report = dq.main(["--quick", "--random", "2", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    (search,) = report["searches"]
    (seed,) = search["seeds"]
    assert len(seed["margin"]) == len(seed["entropy"]) == 6
    assert all(0.0 <= m <= 1.0 for m in seed["margin"])
    assert all(0.0 <= e <= 1.0 + 1e-9 for e in seed["entropy"])
    assert seed["decided"] == dq.decided(seed["margin"])
    assert 0.0 <= seed["test_accuracy"] <= 1.0 and len(report["random"]) == 2
    assert (tmp_path / "r.json").is_file()
    # a rerun reads the finished search and the trainings back instead of repeating them
    again = dq.main(["--quick", "--random", "2", "--workdir", str(tmp_path)])
    assert again["searches"][0]["seeds"][0]["test_accuracy"] == seed["test_accuracy"]
