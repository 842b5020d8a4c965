"""A GDAS search on the NAS-Bench-201 cell space, on scikit-learn's digits.

GDAS (Dong & Yang, "Searching for A Robust Neural Architecture in Four GPU Hours", CVPR 2019):
Gumbel hard straight-through sampling of one op per edge with a linearly annealed temperature.
The whole run is the library's driver (``diffnas_jax.search.driver.run_search``: progress bar,
checkpoints, result.json, plots), followed by training the found cell from scratch beside two
random cells with the same protocol.

Expected output: an NB201 arch string, its test accuracy after from-scratch training (around
0.9 in the quick setting, higher in the full one) and the random cells' accuracies, e.g.
``{'genotype': '|nor_conv_3x3~0|+|...', 'test_accuracy': 0.95, 'random_test_accuracy': [0.9, 0.93]}``.

    python examples/gdas_nb201.py [--out runs/gdas_nb201]
"""
from __future__ import annotations

import argparse
import tempfile

from diffnas_jax.data import load_dataset
from diffnas_jax.search.driver import SearchConfig, run_search
from diffnas_jax.search.evaluate import EvalConfig, random_genotypes, train_and_evaluate


def main(quick: bool = False, out: str | None = None) -> dict:
    out = out or tempfile.mkdtemp(prefix="gdas_nb201_")
    dataset = load_dataset("digits", seed=0)
    config = SearchConfig(space="nb201", method="gdas", dataset="digits", epochs=3 if quick else 15,
                          out=out, progress=not quick, plots=not quick, tensorboard=False)
    result = run_search(config, dataset=dataset)
    genotype = result["genotype"]
    eval_cfg = EvalConfig(space="nb201", epochs=3 if quick else 15)
    found = train_and_evaluate(genotype, eval_cfg, dataset)
    rand = [train_and_evaluate(g, eval_cfg, dataset)["test_accuracy"]
            for g in random_genotypes("nb201", 1 if quick else 4, seed=0)]
    return {"genotype": genotype, "test_accuracy": found["test_accuracy"], "random_test_accuracy": rand,
            "out": out}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/gdas_nb201")
    print(main(out=p.parse_args().out))
