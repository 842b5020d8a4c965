"""Does the default digits search decide, and is its cell better than random cells?

    python benchmarks/digits_quality.py [--quick] [--seeds 0,1,2] [--random 8] [--json FILE]
    python benchmarks/digits_quality.py --sweep "3e-4:25:0,1e-2:25:0" --seeds 0,1,2   # decision only

Default mode: for each search preset of ``--configs`` (``arch_lr:epochs[:warmup[:batch]]``;
by default the old DARTS preset 3e-4:25 and the recommended 3e-2:25) the NB201-style cell is searched on
scikit-learn digits with DARTS first order for every seed of ``--seeds`` (one vmapped program,
``SearchConfig(seeds=...)``); each found genotype and ``--random`` uniformly random genotypes are
then trained from scratch with the same evaluation preset (:class:`EvalConfig`, 30 epochs on
train + val) and tested once on the held-out test split. The script prints, per preset and seed,
the decision statistics of the final mixing weights (the library's
:func:`diffnas_jax.search.decision.edge_decisions`: per-edge entropy, normalised to [0, 1] by
``ln num_ops``, and margin between the chosen op and the runner-up) and a markdown table "searched
vs random" (mean +- std of test accuracy). ``--sweep`` runs the searches only (no training from
scratch). The searches run through the driver :func:`diffnas_jax.search.driver.search_to_dir`.

Decision criterion (:func:`decided`): mean margin >= 0.1 and every edge's margin >= 0.05 (stricter
than the driver's undecided warning, which looks at the mean margin only).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import re
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from diffnas_jax.search.decision import edge_decisions

MEAN_MARGIN = 0.1
MIN_MARGIN = 0.05


def decided(margin: Any, mean_margin: float = MEAN_MARGIN, min_margin: float = MIN_MARGIN) -> bool:
    """The criterion of a search that decided: mean margin >= ``mean_margin`` and every edge's
    margin >= ``min_margin`` (NaN margins fail)."""
    m = np.asarray(margin, np.float64).ravel()
    return bool(m.size and np.all(np.isfinite(m)) and m.mean() >= mean_margin and m.min() >= min_margin)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A search preset: DARTS first order with these overrides (``warmup`` in search epochs)."""

    arch_lr: float
    epochs: int
    warmup: int = 0
    batch_size: int = 64

    @classmethod
    def parse(cls, text: str) -> "Preset":
        parts = text.split(":")
        if not 2 <= len(parts) <= 4:
            raise argparse.ArgumentTypeError(f"a preset is arch_lr:epochs[:warmup[:batch]], got {text!r}")
        vals = [float(parts[0])] + [int(p) for p in parts[1:]]
        return cls(*vals)

    def label(self) -> str:
        s = f"arch lr {self.arch_lr:g}, {self.epochs} epochs"
        if self.warmup:
            s += f", warm-up {self.warmup}"
        if self.batch_size != 64:
            s += f", batch {self.batch_size}"
        return s


def _method_name(p: Preset) -> str:
    """``darts``, or a registered copy of it with ``p.warmup`` frozen-architecture epochs."""
    if not p.warmup:
        return "darts"
    from diffnas_jax.methods import get_method, register_method

    name = f"darts_warmup{p.warmup}of{p.epochs}"
    # the driver keeps the method's warm-up fraction, so warmup/epochs of the copy is what counts
    register_method(dataclasses.replace(get_method("darts"), name=name, epochs=p.epochs, warmup_epochs=p.warmup),
                    overwrite=True)
    return name


def _ops(genotype: str) -> list[str]:
    return re.findall(r"\|([a-z_0-9]+)~\d+", genotype)


def seed_row(seed: dict) -> dict:
    """Decision statistics of one seed of a driver result (``result.json``'s ``seeds`` entry).

    Raises:
      FloatingPointError: the seed's mixing weights are not finite (a diverged search).
    """
    (probs,) = seed["mix"].values()  # NB201: one (edges, ops) leaf
    probs = np.asarray(probs, np.float64)
    if not np.all(np.isfinite(probs)):
        raise FloatingPointError(f"seed {seed['seed']} diverged: non-finite mixing weights")
    st = edge_decisions(probs)
    ops = _ops(seed["genotype"])
    return {"seed": seed["seed"], "genotype": seed["genotype"], "entropy": st["entropy"].tolist(),
            "margin": st["margin"].tolist(), "mean_entropy": float(st["entropy"].mean()),
            "mean_margin": float(st["margin"].mean()), "min_margin": float(st["margin"].min()),
            "decided": decided(st["margin"]), "min_weight": float(np.min(probs)), "max_weight": float(np.max(probs)),
            "param_free_ops": sum(o in ("none", "skip_connect", "avg_pool_3x3") for o in ops),
            "supernet_val_acc": seed.get("final_metrics", {}).get("val_acc")}


def search(p: Preset, seeds: Sequence[int], dataset: Any, out: pathlib.Path) -> dict | None:
    """Search once per seed (vmapped) with preset ``p``; genotype and decision statistics per seed.

    ``out`` keeps the run: a finished one is read back, an interrupted one resumed from its
    checkpoint (``None`` is returned while it is still unfinished)."""
    from diffnas_jax.search.driver import SearchConfig, search_to_dir

    if (out / "result.json").is_file():
        res, wall = json.loads((out / "result.json").read_text()), float("nan")
    else:
        cfg = SearchConfig(method=_method_name(p), epochs=p.epochs, batch_size=p.batch_size, arch_lr=p.arch_lr,
                           seeds=tuple(seeds) if len(seeds) > 1 else None, seed=seeds[0], out=str(out),
                           resume=True, progress=False, tensorboard=False, plots=False, checkpoint_every=55)
        t0 = time.time()
        res = search_to_dir(cfg, dataset=dataset)
        wall = time.time() - t0
        if res["status"] != "complete":
            return None
    try:
        rows = [seed_row(s) for s in res["seeds"]]
    except FloatingPointError as e:
        raise FloatingPointError(f"search {p.label()}: {e}") from None
    # how the decision builds up: per epoch, the seeds' mean margin and supernet train accuracy
    from diffnas_jax.search.logging import read_jsonl

    trace = []
    for rec in read_jsonl(out / "metrics.jsonl"):
        if rec.get("event") == "epoch":
            (probs,) = rec["mix"].values()
            margin = edge_decisions(np.asarray(probs))["margin"]
            trace.append({"epoch": rec["epoch"] + 1, "mean_margin": float(np.mean(margin)),
                          "train_acc": float(np.mean(rec["train_acc"]))})
    return {"preset": dataclasses.asdict(p), "label": p.label(), "steps": res["steps"], "trace": trace,
            "search_time_s": res["search_time_s"], "wall_time_s": round(wall, 1) if np.isfinite(wall) else None,
            "seeds": rows}


def print_search(r: dict) -> None:
    wall = "" if r["wall_time_s"] is None else f", wall {r['wall_time_s']:.0f} s incl. compile"
    seeds = f"{len(r['seeds'])} seeds vmapped" if len(r["seeds"]) > 1 else f"seed {r['seeds'][0]['seed']}"
    print(f"\n{r['label']} ({r['steps']} steps, {seeds}, search {r['search_time_s']:.0f} s"
          f"{wall})")
    every = max(1, len(r["trace"]) // 5)
    print("mean margin (over edges and seeds) by epoch: " + ", ".join(
        f"{t['epoch']}: {t['mean_margin']:.3f} (train acc {t['train_acc']:.2f})" for t in r["trace"][every - 1::every]))
    print("| seed | genotype | weights min-max | mean entropy (1 = uniform) | mean margin | min margin | decided | "
          "param-free ops |")
    print("|---|---|---|---|---|---|---|---|")
    for s in r["seeds"]:
        print(f"| {s['seed']} | `{s['genotype']}` | {s['min_weight']:.3f}-{s['max_weight']:.3f} | "
              f"{s['mean_entropy']:.4f} | {s['mean_margin']:.3f} | {s['min_margin']:.3f} | "
              f"{'yes' if s['decided'] else 'no'} | {s['param_free_ops']}/6 |")
    sys.stdout.flush()


def _stats(accs: Sequence[float]) -> str:
    a = np.asarray(accs, np.float64)
    std = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.4f} +- {std:.4f}"


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="small version: seed 0, one 2-epoch search, 2 random cells, 2-epoch training")
    ap.add_argument("--seeds", default=None, help="search seeds, comma-separated (default 0,1,2)")
    ap.add_argument("--configs", default=None,
                    help="presets arch_lr:epochs[:warmup[:batch]], comma-separated "
                         "(default: the old 3e-4:25 and the recommended 3e-2:25)")
    ap.add_argument("--sweep", default=None, help="like --configs, but search only (no training from scratch)")
    ap.add_argument("--train", default=None,
                    help="indices (0-based, comma-separated) of the presets whose cells are trained from scratch "
                         "(default: all)")
    ap.add_argument("--random", type=int, default=None, help="random genotypes (default 8)")
    ap.add_argument("--eval-epochs", type=int, default=None, help="from-scratch epochs (default: EvalConfig's 30)")
    ap.add_argument("--json", default=None, help="write every figure to this (strict) JSON file")
    ap.add_argument("--workdir", default="runs/digits_quality",
                    help="keeps searches and from-scratch results: rerunning continues where a run stopped")
    args = ap.parse_args(argv)

    from diffnas_jax.data import load_dataset
    from diffnas_jax.search.evaluate import EvalConfig, random_genotypes, train_and_evaluate

    seeds = tuple(int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(","))
    text = args.sweep or args.configs or ("3e-2:2" if args.quick else "3e-4:25,3e-2:25")
    presets = [Preset.parse(t) for t in text.split(",")]
    n_random = args.random if args.random is not None else (2 if args.quick else 8)
    ecfg = EvalConfig(space="nb201", dataset="digits")
    if args.eval_epochs or args.quick:
        ecfg = dataclasses.replace(ecfg, epochs=args.eval_epochs or 2)
    ds = load_dataset("digits", seed=0)
    report: dict[str, Any] = {"seeds": list(seeds), "criterion": {"mean_margin": MEAN_MARGIN, "min_margin": MIN_MARGIN},
                              "eval_config": dataclasses.asdict(ecfg), "searches": []}
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # a search resumed after an interruption reuses its compiled step instead of compiling again
    jax.config.update("jax_compilation_cache_dir", str(work / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 5.0)
    for p in presets:
        tag = f"lr{p.arch_lr:g}_e{p.epochs}_w{p.warmup}_b{p.batch_size}_s{'-'.join(map(str, seeds))}"
        r = search(p, seeds, ds, work / tag)
        if r is None:
            print(f"search {p.label()} stopped before the end; rerun to continue it", file=sys.stderr)
            sys.exit(1)
        print_search(r)
        report["searches"].append(r)
    if not args.sweep:
        print(f"\nfrom-scratch training: {ecfg.epochs} epochs on train + val ({len(ds.y_train) + len(ds.y_val)} "
              f"images), test on {len(ds.y_test)} held-out images (one image = {100 / len(ds.y_test):.2f} pp)")
        # one file per evaluation protocol: {genotype: test accuracy}, written after each training
        proto = hashlib.sha256(json.dumps(dataclasses.asdict(ecfg), sort_keys=True).encode()).hexdigest()[:12]
        cache_file = work / f"evals_{proto}.json"
        cache: dict[str, float] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

        def test_acc(g: str) -> float:
            if g not in cache:
                cache[g] = float(train_and_evaluate(g, ecfg, ds)["test_accuracy"])
                cache_file.write_text(json.dumps(cache, indent=1, allow_nan=False))
                print(f"  trained {g}: test accuracy {cache[g]:.4f}", flush=True)
            return cache[g]

        train = range(len(presets)) if args.train is None else [int(i) for i in args.train.split(",")]
        for i in train:
            for s in report["searches"][i]["seeds"]:
                s["test_accuracy"] = test_acc(s["genotype"])
        rand = [{"genotype": str(g), "test_accuracy": test_acc(str(g))}
                for g in random_genotypes("nb201", n_random, seed=0, num_classes=ds.num_classes)]
        report["random"] = rand
        ra = [r["test_accuracy"] for r in rand]
        print("\n| cells | n | test accuracy mean +- std | per cell | decided seeds |")
        print("|---|---|---|---|---|")
        for r in report["searches"]:
            if "test_accuracy" not in r["seeds"][0]:
                continue
            accs = [s["test_accuracy"] for s in r["seeds"]]
            print(f"| searched, {r['label']} | {len(accs)} | {_stats(accs)} | "
                  f"{', '.join(f'{a:.4f}' for a in accs)} | {sum(s['decided'] for s in r['seeds'])}/{len(accs)} |")
        if ra:
            print(f"| random (uniform genotypes, seed 0) | {len(ra)} | {_stats(ra)} | "
                  f"{', '.join(f'{a:.4f}' for a in ra)} | - |")
            print(f"random median {np.median(ra):.4f}, best {np.max(ra):.4f}, worst {np.min(ra):.4f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1, allow_nan=False))
    return report


if __name__ == "__main__":
    main()
