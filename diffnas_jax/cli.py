"""The ``diffnas`` command line: ``diffnas search | evaluate | baseline | profile``.

Subcommands are registered by small functions so the heavy imports (jax, flax) only happen
when a subcommand runs; ``diffnas --help`` is instant.

With no flags, ``diffnas search`` searches an NAS-Bench-201-style cell on scikit-learn's digits
(DARTS first order, 25 epochs, a few minutes on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import pathlib
import sys
import warnings
from typing import Sequence

from ._choices import BASELINE_STRATEGIES, HYPERGRADIENTS, SELECTIONS
from .spaces import registry  # imports no JAX

SPACES = registry.list_spaces()

# exit statuses
EXIT_USAGE = 2       # bad flag, file or configuration (nothing run)
EXIT_DIVERGED = 3    # the search became non-finite (result.json says where)
EXIT_IO = 4          # a file could not be written (disk full, permissions)
EXIT_INTERRUPTED = 130


def _configure_logging() -> None:
    """``DIFFNAS_LOG_LEVEL`` (default WARNING) sets the level of the ``diffnas_jax`` loggers.

    XLA's native log lines during a compile (e.g. the "Very slow compile?" alarm) are routed to
    the ``diffnas_jax.xla`` logger at DEBUG (:mod:`diffnas_jax.search.native_log`), so
    ``DIFFNAS_LOG_LEVEL=DEBUG`` shows them and the default keeps them out of the terminal.
    """
    import logging

    level = os.environ.get("DIFFNAS_LOG_LEVEL", "WARNING").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        print(f"diffnas: error: DIFFNAS_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level!r}",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    log = logging.getLogger("diffnas_jax")
    log.setLevel(level)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated ints, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds must be distinct ints >= 0, got {text!r}")
    return seeds


def _int_at_least(minimum: int, what: str):
    """An argparse type: an int >= ``minimum`` (``what`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_nonnegative = _int_at_least(0, "an int >= 0")
_positive = _int_at_least(1, "a positive int")


def _rate(text: str) -> float:
    """A learning rate: a finite float >= 0 (nan, inf and negative rates are refused here)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W,C as three positive ints, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W,C as three positive ints, got {text!r}")
    return shape


def _size_help(generic: str) -> str:
    """The search preset's value of ``channels`` / ``layers`` for each space that has that size."""
    parts = []
    for name in SPACES:
        entry = registry.get_space(name)
        own = entry.size_names.get(generic)
        parts.append(f"{name} {entry.search_preset[own]}" if own else f"{name}: fixed")
    return ", ".join(parts)


_CHANNELS_HELP = "supernet channels (default per space: " + _size_help("channels") + ")"
_LAYERS_HELP = ("supernet depth, cells per stage for nb201 (default per space: " + _size_help("layers") + ")")



def _data_args(p: argparse.ArgumentParser, dataset_default: str | None = "digits") -> None:
    p.add_argument("--dataset", default=dataset_default,
                   help="digits (scikit-learn, default) | cifar10 (needs --data-dir) | synthetic | FILE.npz "
                        "with x_train, y_train, x_test, y_test [, x_val, y_val]")
    p.add_argument("--data-dir", default=None, help="folder with the extracted CIFAR-10 batches (either layout)")
    p.add_argument("--data-seed", type=_nonnegative, default=None, help="seed of the train/val/test split (default 0)")


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="run a differentiable architecture search",
                       description="Differentiable architecture search; writes result.json, metrics.jsonl, "
                                   "checkpoints and PNG plots to --out.")
    p.add_argument("--space", choices=SPACES, default="nb201", help="search space (default nb201)")
    p.add_argument("--method", default="darts", help="darts | darts_2nd | gdas | snas | drnas | pcdarts | "
                                                     "fairdarts | darts_pt | ... (default darts)")
    p.add_argument("--hypergrad", choices=HYPERGRADIENTS, default=None,
                   help="override the method's estimator: " + " | ".join(HYPERGRADIENTS))
    p.add_argument("--select", choices=SELECTIONS, default="argmax",
                   help="genotype selection: magnitude argmax or DARTS-PT perturbation")
    _data_args(p)
    p.add_argument("--epochs", type=_positive, default=None, help="search epochs (default 25)")
    p.add_argument("--batch-size", type=_positive, default=None, help="global batch size (default 64)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seed", type=_nonnegative, default=0, help="search seed (default 0)")
    g.add_argument("--seeds", type=_seeds, default=None,
                   help="comma-separated seeds searched together in one vmapped program, e.g. 0,1,2,3")
    p.add_argument("--out", default="runs/search", help="output folder (default runs/search)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--devices", type=_positive, default=1,
                   help="data-parallel devices (a jax.sharding Mesh over the batch axis)")
    p.add_argument("--checkpoint-every", type=_nonnegative, default=None,
                   help="steps between checkpoints (default 100; 0: only at the end and on signals)")
    p.add_argument("--channels", type=_positive, default=None, help=_CHANNELS_HELP)
    p.add_argument("--layers", type=_positive, default=None, help=_LAYERS_HELP)
    p.add_argument("--arch-lr", type=_rate, default=None, help="override the method's architecture lr (>= 0)")
    p.add_argument("--weight-lr", type=_rate, default=None, help="override the method's weight lr (>= 0)")
    p.add_argument("--compile-cache", default=None, metavar="DIR|off",
                   help="persistent XLA compilation cache (default: $DIFFNAS_COMPILE_CACHE, else "
                        "$XDG_CACHE_HOME/diffnas_jax/xla, i.e. ~/.cache/diffnas_jax/xla); 'off' disables it")
    p.add_argument("--fused-step", action="store_true",
                   help="compile the search step as one program even when the estimator has a staged form "
                        "(implicit cg / neumann run their solver loop from the host by default: much shorter compile)")
    p.add_argument("--augment", action="store_true", help="random crop (+flip) on search batches")
    p.add_argument("--cost", default="flops",
                   help="cost of the resource-aware methods (fbnet, proxyless, ...): flops | params | a latency "
                        "table JSON written by `diffnas profile` (default flops)")
    p.add_argument("--evaluate", action="store_true",
                   help="afterwards train each found genotype from scratch (as `diffnas evaluate`)")
    p.add_argument("--eval-epochs", type=_positive, default=None, help="epochs of --evaluate (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.set_defaults(func=cmd_search)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="train a genotype from scratch; report test accuracy, params, FLOPs",
                       description="Train the discrete network of a genotype from scratch on train+val and "
                                   "report test accuracy, parameters and FLOPs (also as DIR2/eval.json).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--genotype", help="NB201 arch string, DARTS Genotype(...) text or a built-in name (DARTS_V2)")
    g.add_argument("--result", help="a search's result.json (its genotype(s), space and dataset)")
    p.add_argument("--space", choices=SPACES, default=None, help="space of --genotype (default: guessed)")
    _data_args(p, None)
    p.add_argument("--epochs", type=_positive, default=None, help="training epochs (default 30)")
    p.add_argument("--batch-size", type=_positive, default=None, help="batch size (default 64)")
    p.add_argument("--seed", type=_nonnegative, default=0, help="training seed")
    p.add_argument("--channels", type=_positive, default=None, help=_CHANNELS_HELP.replace("supernet", "network"))
    p.add_argument("--layers", type=_positive, default=None, help=_LAYERS_HELP.replace("supernet", "network"))
    p.add_argument("--out", default=None, help="folder for eval.json (default: next to --result)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def _add_baseline(sub) -> None:
    p = sub.add_parser("baseline", help="black-box baselines: random, local search, evolution, BANANAS",
                       description="Train architectures of the space from scratch with the evaluation protocol; "
                                   "writes DIR/baseline.json (rerun with the same flags to continue). random: test "
                                   "accuracy of --num uniformly sampled architectures. local_search / evolution / "
                                   "bananas: --num queries guided by validation accuracy (train on train, test on "
                                   "val), then the best is trained on train+val and tested.")
    p.add_argument("--strategy", choices=BASELINE_STRATEGIES, default="random",
                   help="random (default) | local_search (White et al. 2021) | evolution (regularised, Real et al. "
                        "2019) | bananas (White et al. 2021)")
    p.add_argument("--num", type=_positive, default=20, help="number of architectures trained (default 20)")
    p.add_argument("--space", choices=SPACES, default="nb201", help="search space (default nb201)")
    _data_args(p)
    p.add_argument("--epochs", type=_positive, default=None, help="training epochs per architecture (default 30)")
    p.add_argument("--batch-size", type=_positive, default=None, help="batch size (default 64)")
    p.add_argument("--seed", type=_nonnegative, default=0, help="sampling and training seed")
    p.add_argument("--channels", type=_positive, default=None, help=_CHANNELS_HELP.replace("supernet", "network"))
    p.add_argument("--layers", type=_positive, default=None, help=_LAYERS_HELP.replace("supernet", "network"))
    p.add_argument("--out", default="runs/baseline", help="output folder (default runs/baseline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_baseline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffnas",
        description="Differentiable neural architecture search in JAX (diffnas_jax).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{search,evaluate,baseline,profile}")
    _add_search(sub)
    _add_evaluate(sub)
    _add_baseline(sub)
    _add_profile(sub)
    return parser


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure a latency look-up table of a space's candidate ops on this device")
    p.add_argument("--space", default="mbconv", choices=registry.spaces_with_latency_profiler(),
                   help="a registered space whose entry has a latency profiler (default mbconv)")
    p.add_argument("--input", type=_shape, default=(32, 32, 3), help="H,W,C of one example (default 32,32,3)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per op (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="examples per timed call")
    p.add_argument("--out", default="latency_table.json", help="JSON table to write")
    p.add_argument("--compare", default=None, help="another device's table: print per-op latency ratios")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    from diffnas_jax import cost

    shape = tuple(args.input)
    space = registry.make_space(args.space)
    table = cost.profile_latency(space, shape, args.repeats, warmup=args.warmup, batch_size=args.batch)
    cost.save_table(table, args.out)
    meta = table.meta
    print(f"{args.space} on {meta['device']}: {len(meta['entries'])} entries, fixed part {table.constant:.3f} ms; "
          f"wrote {args.out}")
    if args.compare:
        ratios = cost.compare_tables(table, cost.load_table(args.compare))
        for k, v in ratios.items():
            print(f"  {k}: {v:.3f}x")
    return 0


# ---------------------------------------------------------------------------------------------
# Commands (heavy imports inside)
# ---------------------------------------------------------------------------------------------
def _force_host_devices(n: int) -> None:
    """Let ``--devices N`` work on a CPU-only machine: XLA must be told before jax is imported."""
    if n > 1 and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()


def _eval_config(args, space: str, dataset: str, data_dir, data_seed: int, epochs=None):
    from diffnas_jax.search.evaluate import EvalConfig

    kw = dict(space=space, dataset=dataset, data_dir=data_dir, data_seed=data_seed, seed=args.seed)
    if epochs is not None:
        kw["epochs"] = epochs
    if getattr(args, "batch_size", None) is not None and args.command != "search":
        kw["batch_size"] = args.batch_size
    for k in ("channels", "layers"):
        if getattr(args, k, None) is not None and args.command != "search":
            kw[k] = getattr(args, k)
    return EvalConfig(**_resolved_size(space, kw))


def _resolved_size(space: str, kw: dict) -> dict:
    """Fill unset ``channels``/``layers`` with the evaluation preset, so eval.json records real values."""
    entry = registry.get_space(space)
    for generic, own in entry.size_names.items():
        if kw.get(generic) is None and own in entry.eval_preset:
            kw[generic] = entry.eval_preset[own]
    return kw


def _summary(accs: Sequence[float]) -> dict:
    import numpy as np

    a = np.asarray(accs, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "median": float(np.median(a)), "best": float(a.max()), "worst": float(a.min()), "n": int(len(a))}


def _write_json(path: pathlib.Path, obj) -> None:
    from diffnas_jax._json import write_json

    write_json(path, obj)


def _validate_search(args) -> str | None:
    """Checks that need no JAX and no data (run before the heavy imports); an error line or None."""
    from diffnas_jax.methods import get_method  # light: the registry imports no jax

    try:
        get_method(args.method)
    except ValueError as e:
        return str(e)
    if args.cost not in ("flops", "params") and not (args.cost.endswith(".json") and os.path.isfile(args.cost)):
        return (f"--cost must be flops, params or an existing latency table .json (from `diffnas profile`), "
                f"got {args.cost!r}")
    ds = args.dataset
    if ds.endswith(".npz") and not os.path.isfile(ds):
        return f"npz data set {ds} not found"
    if ds == "cifar10" and args.data_dir is not None and not os.path.isdir(args.data_dir):
        return f"--data-dir {args.data_dir} is not a directory"
    return None


def _io_error_line(e: BaseException) -> str | None:
    """One line for a failed write (disk full, permissions), naming the file or directory."""
    from diffnas_jax.search.checkpoint import os_error

    err = os_error(e)
    if err is None:
        return None
    where = err.filename or "the output folder"
    if err.errno == errno.ENOSPC:
        return f"no space left on device writing {where}"
    return f"cannot write {where}: {err.strerror or err}"


def cmd_search(args) -> int:
    problem = _validate_search(args)
    if problem is not None:
        print(f"diffnas search: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    _force_host_devices(args.devices)
    _configure_logging()
    from diffnas_jax.search.checkpoint import CheckpointError, CheckpointWriteError
    from diffnas_jax.search.driver import RunInUseError, SearchConfig, UndecidedSearchWarning, search_to_dir

    kw = dict(space=args.space, method=args.method, hypergrad=args.hypergrad, select=args.select,
              dataset=args.dataset, data_dir=args.data_dir, seed=args.seed, seeds=args.seeds,
              devices=args.devices, out=args.out, resume=args.resume, channels=args.channels,
              layers=args.layers, arch_lr=args.arch_lr, weight_lr=args.weight_lr, augment=args.augment,
              cost=args.cost, progress=not args.no_progress, plots=not args.no_plots,
              compile_cache=args.compile_cache, staged_step=not args.fused_step)
    for k in ("epochs", "batch_size", "checkpoint_every", "data_seed"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    try:
        config = SearchConfig(**kw)
        with warnings.catch_warnings():
            # reported below as one line per seed, not as a Python warning with its source line
            warnings.simplefilter("ignore", UndecidedSearchWarning)
            result = search_to_dir(config)
    except CheckpointWriteError as e:
        print(f"diffnas search: error: {e}", file=sys.stderr)
        return EXIT_IO
    except (RunInUseError, CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"diffnas search: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        line = _io_error_line(e)
        if line is None:
            raise
        print(f"diffnas search: error: {line}", file=sys.stderr)
        return EXIT_IO
    if result["status"] == "diverged":
        prefix = f"the run in {config.out} already ended (left unchanged): " if result.get("already_complete") else ""
        print(f"diffnas search: error: {prefix}{result['message']}; result.json records it"
              f"{'' if result.get('last_checkpoint') else ' (no checkpoint was written before it)'}",
              file=sys.stderr)
        return EXIT_DIVERGED
    if result["status"] != "complete":
        return EXIT_INTERRUPTED
    if result.get("already_complete"):
        print(f"the run in {config.out} is already complete; result.json left unchanged", file=sys.stderr)
    out = pathlib.Path(config.out)
    for s in result["seeds"]:
        val = s["final_metrics"].get("val_acc")
        d = s.get("decision") or {}
        print(f"seed {s['seed']}: genotype {s['genotype']}  (supernet val acc "
              f"{'n/a' if val is None else format(val, '.4f')}; mean margin {d.get('mean_margin', float('nan')):.3f}, "
              f"mean entropy {d.get('mean_entropy', float('nan')):.3f})")
    for s in result["seeds"]:
        d = s.get("decision") or {}
        if d and not d["decided"]:
            print(f"warning: seed {s['seed']}: the search ended undecided: mean margin {d['mean_margin']:.3f} < "
                  f"{d['threshold']} between chosen op and runner-up ({d['undecided_edges']} of {d['num_edges']} "
                  "edges below); the genotype is an argmax over near-ties: search longer (--epochs) or raise "
                  "--arch-lr", file=sys.stderr)
    print(f"search time {result['search_time_s']:.1f} s; results in {out / 'result.json'}")
    if args.evaluate and not result.get("already_complete"):
        from diffnas_jax.search.evaluate import train_and_evaluate

        ecfg = _eval_config(args, config.space, config.dataset, config.data_dir, config.data_seed,
                            args.eval_epochs)
        evals = []
        for s in result["seeds"]:
            r = train_and_evaluate(s["genotype"], ecfg, progress=not args.no_progress,
                                   desc=f"evaluate seed {s['seed']}")
            r["search_seed"] = s["seed"]
            evals.append(r)
            print(f"seed {s['seed']}: test accuracy {r['test_accuracy']:.4f}, params {r['params']}, "
                  f"FLOPs {r['flops']:.3g}")
        summary = _summary([r["test_accuracy"] for r in evals])
        if len(evals) > 1:
            print(f"test accuracy over {len(evals)} seeds: {summary['mean']:.4f} +- {summary['std']:.4f}")
        _write_json(out / "eval.json", {"evaluations": evals, "test_accuracy": summary})
        result["evaluation"] = {"test_accuracy": summary, "per_seed": [r["test_accuracy"] for r in evals]}
        _write_json(out / "result.json", result)
    return 0


def cmd_evaluate(args) -> int:
    _configure_logging()
    from diffnas_jax.search.evaluate import train_and_evaluate
    from diffnas_jax.spaces.genotypes import space_of_genotype_text

    data_seed = 0 if args.data_seed is None else args.data_seed
    if args.result:
        path = pathlib.Path(args.result)
        if path.is_dir():
            path = path / "result.json"
        try:
            res = json.loads(path.read_text())
        except FileNotFoundError:
            print(f"diffnas evaluate: error: {path} not found", file=sys.stderr)
            return EXIT_USAGE
        except (ValueError, OSError) as e:
            print(f"diffnas evaluate: error: {path} is not a readable JSON file ({e})", file=sys.stderr)
            return EXIT_USAGE
        seeds = res.get("seeds") if isinstance(res, dict) else None
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, dict) and "genotype" in s for s in seeds):
            status = res.get("status") if isinstance(res, dict) else None
            why = f" (its status is {status!r})" if status not in (None, "complete") else ""
            print(f"diffnas evaluate: error: {path} is not a search result: it has no 'seeds' list with "
                  f"genotypes{why}", file=sys.stderr)
            return EXIT_USAGE
        genotypes = [s["genotype"] for s in seeds]
        cfg = res.get("config", {}) if isinstance(res.get("config"), dict) else {}
        space = args.space or res.get("space", "nb201")
        dataset = args.dataset or cfg.get("dataset", "digits")
        data_dir = args.data_dir or cfg.get("data_dir")
        if args.data_seed is None:
            data_seed = cfg.get("data_seed", 0)
        out = pathlib.Path(args.out) if args.out else path.parent
    else:
        genotypes = [args.genotype]
        space = args.space or space_of_genotype_text(args.genotype)
        dataset = args.dataset or "digits"
        data_dir = args.data_dir
        out = pathlib.Path(args.out) if args.out else None
    if space not in SPACES:
        print(f"diffnas evaluate: error: space {space!r} has no built-in evaluation network; expected one of "
              f"{', '.join(SPACES)} (pass --space)", file=sys.stderr)
        return EXIT_USAGE
    try:
        ecfg = _eval_config(args, space, dataset, data_dir, data_seed, args.epochs)
        evals = [train_and_evaluate(g, ecfg, progress=not args.no_progress) for g in genotypes]
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"diffnas evaluate: error: {e}", file=sys.stderr)
        return 2
    for r in evals:
        print(f"{r['genotype']}\n  test accuracy {r['test_accuracy']:.4f}  params {r['params']}  "
              f"FLOPs {r['flops']:.4g}  ({r['train_time_s']:.1f} s)")
    summary = _summary([r["test_accuracy"] for r in evals])
    report = dict(evals[0]) if len(evals) == 1 else {"evaluations": evals}
    report["test_accuracy" if len(evals) > 1 else "test_accuracy_summary"] = summary
    if len(evals) > 1:
        print(f"test accuracy over {len(evals)} genotypes: {summary['mean']:.4f} +- {summary['std']:.4f}")
    if out is not None:
        _write_json(out / "eval.json", report)
        print(f"wrote {out / 'eval.json'}")
    return 0


def _previous_baseline(path: pathlib.Path, ecfg, strategy: str, num: int, seed: int) -> dict:
    """The stored baseline.json when it used the same protocol (to continue it), else ``{}``."""
    if not path.is_file():
        return {}
    try:
        prev = json.loads(path.read_text())
    except ValueError:
        return {}
    same = (isinstance(prev, dict) and prev.get("config") == _jsonable_config(ecfg) and prev.get("strategy") == strategy
            and prev.get("seed", seed) == seed)
    return prev if same else {}


def cmd_baseline(args) -> int:
    _configure_logging()
    from diffnas_jax.data import load_dataset
    from diffnas_jax.search.evaluate import random_genotypes, train_and_evaluate

    data_seed = 0 if args.data_seed is None else args.data_seed
    try:
        dataset = load_dataset(args.dataset, data_dir=args.data_dir, seed=data_seed)
        ecfg = _eval_config(args, args.space, args.dataset, args.data_dir, data_seed, args.epochs)
        if args.strategy != "random":
            return _guided_baseline(args, dataset, ecfg)
        genotypes = random_genotypes(args.space, args.num, args.seed, dataset.num_classes)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"diffnas baseline: error: {e}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    path = out / "baseline.json"
    prev = _previous_baseline(path, ecfg, args.strategy, args.num, args.seed)
    # continue an interrupted baseline with the same protocol
    done = {r["genotype"]: r for r in prev.get("architectures", [])}
    rows = []
    for i, g in enumerate(genotypes):
        if str(g) in done:
            rows.append(done[str(g)])
            continue
        r = train_and_evaluate(g, ecfg, dataset, progress=not args.no_progress, desc=f"random {i + 1}/{args.num}")
        rows.append({k: r[k] for k in ("genotype", "test_accuracy", "train_accuracy", "params", "flops",
                                       "train_time_s")})
        print(f"[{i + 1}/{args.num}] {r['genotype']}  test accuracy {r['test_accuracy']:.4f}")
        _write_json(path, {"strategy": args.strategy, "num": args.num, "architectures": rows,
                           "config": _jsonable_config(ecfg), "complete": False})
    summary = _summary([r["test_accuracy"] for r in rows])
    _write_json(path, {"strategy": args.strategy, "num": args.num, "architectures": rows,
                       "config": _jsonable_config(ecfg), "complete": True, **summary})
    print(f"random baseline over {len(rows)} architectures: mean {summary['mean']:.4f}, median "
          f"{summary['median']:.4f}, best {summary['best']:.4f}; wrote {path}")
    return 0


def _guided_baseline(args, dataset, ecfg) -> int:
    """``local_search`` / ``evolution`` / ``bananas`` over the space's codec.

    The strategies maximise *validation* accuracy (each queried architecture trained from scratch
    on the train split, tested on the validation split: the test split must not steer a search);
    the best one is then trained on train + val and tested, as ``diffnas evaluate`` does. Every
    query is stored in ``baseline.json`` as it finishes; a rerun with the same flags replays the
    stored answers (the strategies are deterministic under their key) and continues.
    """
    import dataclasses

    import jax

    from diffnas_jax.baselines.codec import codec_for
    from diffnas_jax.baselines.strategies import get_strategy
    from diffnas_jax.search import evaluate as ev
    from diffnas_jax.spaces.genotypes import genotype_text
    codec = codec_for(registry.make_space(args.space, dataset.num_classes))
    # train on train, "test" on val: the query answers a strategy sees
    selection = dataclasses.replace(dataset, x_val=dataset.x_val[:0], y_val=dataset.y_val[:0],
                                    x_test=dataset.x_val, y_test=dataset.y_val)
    out = pathlib.Path(args.out)
    path = out / "baseline.json"
    prev = _previous_baseline(path, ecfg, args.strategy, args.num, args.seed)
    done = {r["genotype"]: r for r in prev.get("architectures", [])}
    rows: list[dict] = []
    header = {"strategy": args.strategy, "num": args.num, "seed": args.seed, "metric": "val_accuracy",
              "config": _jsonable_config(ecfg)}

    def objective(genotype):
        key = genotype_text(genotype)
        row = done.get(key)
        if row is None:
            r = ev.train_and_evaluate(genotype, ecfg, selection, progress=not args.no_progress,
                                      desc=f"{args.strategy} {len(rows) + 1}/{args.num}")
            row = {"genotype": key, "val_accuracy": r["test_accuracy"], "train_accuracy": r["train_accuracy"],
                   "params": r["params"], "flops": r["flops"], "train_time_s": r["train_time_s"]}
            print(f"[{len(rows) + 1}/{args.num}] {key}  val accuracy {row['val_accuracy']:.4f}")
        rows.append(row)
        _write_json(path, {**header, "architectures": rows, "complete": False})
        return {"accuracy": row["val_accuracy"]}

    history = get_strategy(args.strategy)(codec, objective, args.num, jax.random.key(args.seed))
    best_genotype, best_metrics = history.best
    best_key = rows[int(max(range(len(history.values)), key=lambda i: history.values[i]))]["genotype"]
    stored_best = prev.get("best") if prev.get("complete") else None
    if stored_best and stored_best.get("genotype") == best_key:
        best = stored_best
    else:
        r = ev.train_and_evaluate(best_genotype, ecfg, dataset, progress=not args.no_progress,
                                  desc=f"{args.strategy} best")
        best = {"genotype": best_key, "val_accuracy": float(best_metrics["accuracy"]),
                "test_accuracy": r["test_accuracy"], "params": r["params"], "flops": r["flops"]}
    vals = _summary([r["val_accuracy"] for r in rows])
    _write_json(path, {**header, "architectures": rows, "complete": True, "val_accuracy": vals, "best": best,
                       "best_so_far": [float(v) for v in history.best_so_far()]})
    print(f"{args.strategy} over {len(rows)} architectures: best val accuracy {best['val_accuracy']:.4f} "
          f"({best['genotype']}); its test accuracy after training on train+val {best['test_accuracy']:.4f}; "
          f"wrote {path}")
    return 0


def _jsonable_config(cfg) -> dict:
    import dataclasses

    from diffnas_jax.search.logging import to_jsonable

    return to_jsonable(dataclasses.asdict(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from diffnas_jax import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    if argv is None:  # this process is the `diffnas` command: start again with huge pages
        from diffnas_jax.search.host_memory import restart_with_huge_pages

        try:
            restart_with_huge_pages()
        except ValueError as e:
            print(f"diffnas: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
