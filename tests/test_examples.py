"""Every example runs in its small setting and shows its key result."""
from __future__ import annotations

import pytest

from conftest import ROOT, load_script

EXAMPLES = ROOT / "examples"


# `python examples/X.py` runs in JAX's default float32, so its test does too
pytestmark = pytest.mark.usefixtures("float32_module")


def run_example(name: str, **kwargs):
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}").main(**kwargs)


def test_learning_to_rank_reaches_high_spearman():
    r = run_example("learning_to_rank", quick=True)
    assert r["spearman_before"] < 0.5 < 0.9 < r["spearman_after"]


def test_neuralsort_knn_beats_chance_by_a_wide_margin():
    r = run_example("neuralsort_knn_digits", quick=True)
    assert r["knn_accuracy"] > 0.8 > 8 * r["chance"] - 0.1


def test_l2x_selects_informative_features():
    r = run_example("l2x_feature_selection", quick=True)
    assert r["posthoc_accuracy"] > 0.75
    assert r["relevant_recovered"] > 0.3


def test_sorting_network_learns_order_from_ranks_only():
    r = run_example("sorting_network_digits", quick=True)
    assert r["position_accuracy"] > 0.6
    assert r["exact_order"] > 20 * r["chance_exact"]


def test_soft_decision_tree_hard_routing_is_accurate():
    r = run_example("soft_decision_tree", quick=True)
    assert r["hard_tree_accuracy"] > 0.75


def test_implicit_hpo_lowers_validation_loss():
    r = run_example("implicit_hpo", quick=True)
    assert r["val_loss_after"] < 0.9 * r["val_loss_before"]


def test_user_space_cnn_search_gdas_single_path():
    r = run_example("search_cnn_digits", quick=True, method="gdas")
    assert len(r["genotype"]) == 6  # 3 layers x (kernel choice, width choice)
    assert r["test_accuracy"] > 0.8


def test_transformer_block_search_picks_attention():
    r = run_example("search_transformer_block", quick=True)
    assert "attention" in r["genotype"].values()
    assert r["test_accuracy"] > 0.8


@pytest.mark.slow
def test_gdas_nb201_search_and_evaluation(tmp_path):
    r = run_example("gdas_nb201", quick=True, out=str(tmp_path / "run"))
    assert r["genotype"].count("~") == 6
    assert r["test_accuracy"] > 0.5


def test_darts_cifar10_skips_cleanly_without_data(capsys, monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    assert run_example("darts_cifar10", data_dir="/nonexistent/cifar") is None
    assert "Skipping" in capsys.readouterr().out
