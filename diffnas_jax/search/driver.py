"""The search driver: one configuration in, a searched architecture and its records out.

``search_to_dir(SearchConfig(...))`` (old name ``run_search``) is the file I/O around the library
loop :func:`diffnas_jax.search.loop.run_search`. It builds the four axes (space, relaxation from the method,
hypergradient estimator, selector), the optax optimizers (SGD with a cosine schedule on the
weights, Adam on the architecture, as DARTS, Liu et al. ICLR 2019), jit-compiles
:func:`diffnas_jax.search.make_step`, and runs it over ``(train, val)`` batch pairs with:

- a progress bar (epoch, step, losses, accuracies, temperature, ETA) and ``metrics.jsonl``
  (one record per step, one per epoch with the mixing weights of every edge);
- verified atomic orbax checkpoints of the whole :class:`SearchState` every
  ``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM; ``resume=True`` continues from
  the newest and ends bitwise equal (on CPU) to an uninterrupted run: the step key is
  ``fold_in(key(seed), step)`` and the data order a pure function of ``(seed, epoch)``;
- data parallelism: with ``devices=N`` the batch is placed on a ``jax.sharding.Mesh`` over its
  batch axis (``NamedSharding``), the state replicated; XLA inserts the all-reduces, so
  BatchNorm statistics and gradients are those of the global batch;
- several seeds (``seeds=(0, 1, 2, 3)``) in one compiled program through ``jax.vmap`` over a
  leading seed axis of the state, the step keys and the batches (each seed its own data order).

- the step compiled before the progress bar starts (it prints the time; the ETA counts steps
  only), with a persistent XLA compilation cache (:mod:`diffnas_jax.search.compile_cache`);
- a finiteness check of losses, weights, BatchNorm statistics and architecture at every step:
  the first non-finite step ends the run with ``"status": "diverged"`` (never checkpointed);
- per-edge entropy and margin of the final mixing weights (:mod:`diffnas_jax.search.decision`)
  and an :class:`UndecidedSearchWarning` when the search ends undecided.

Outputs in ``out`` (every JSON strict, see :mod:`diffnas_jax._json`): ``result.json``,
``metrics.jsonl``, ``run.json``, ``checkpoints/``, ``cell*.png``, ``arch_weights*.png`` (and
``tensorboard/`` when ``tensorboardX`` is installed).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import os
import pathlib
import platform
import signal
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._choices import HYPERGRADIENTS, SELECTIONS
from ..spaces import registry
from ..spaces.registry import make_space
from .._json import NON_FINITE_KEY, write_json
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, restore_checkpoint, save_checkpoint
from . import host_memory
from .compile_cache import enable_compile_cache
from .native_log import xla_log_to_debug
from .decision import summarize_decisions
from .logging import MetricsLogger, read_jsonl, to_jsonable
from ..spaces.base import SearchSpace

__all__ = ["SearchConfig", "search_to_dir", "run_search", "build_search", "UndecidedSearchWarning", "SearchSetup",
           "RunInUseError", "make_space", "make_mesh", "shard_batch", "replicate", "StagedStep"]

# fields that do not change the trajectory (outputs, resume, budgets): left out of the fingerprint
_NOT_TRAJECTORY = ("out", "resume", "progress", "tensorboard", "plots", "max_steps", "checkpoint_every",
                   "compile_cache", "staged_step")


class RunInUseError(RuntimeError):
    """``out`` holds another run's checkpoints (pass ``resume=True`` to continue it)."""


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Everything that defines a search run (recorded in ``result.json``).

    Attributes:
      space: ``"nb201"`` | ``"darts"`` | ``"mbconv"``.
      method: a name of :func:`diffnas_jax.methods.list_methods` (relaxation, estimator, optimizer
        defaults); its CIFAR-sized ``epochs`` / ``batch_size`` are replaced by this config's.
      hypergrad: override of the method's estimator (``first_order``, ``unrolled``, ``implicit``, ...).
      select: ``"argmax"`` (magnitude) or ``"perturbation"`` (DARTS-PT, Wang et al. 2021).
      dataset: ``digits`` | ``cifar10`` | ``synthetic`` | a path to ``FILE.npz``.
      data_dir: CIFAR-10 folder.
      data_seed: seed of the train/val/test split (kept fixed across search seeds so every
        architecture is tested on the same images).
      epochs, batch_size: search length and per-step batch (split over ``devices``).
      seed: search seed; ``seeds``: several seeds vmapped in one program (overrides ``seed``).
      devices: number of devices of the batch-axis mesh.
      out: output folder; ``resume``: continue from its newest checkpoint.
      checkpoint_every: steps between checkpoints (0: only at the end and on signals).
      channels, layers: supernet size (``None``: the space's search preset in :mod:`diffnas_jax.spaces.registry`); for NB201 ``layers``
        is the number of cells per stage ``N``.
      arch_lr, weight_lr: overrides of the method's learning rates (``arch_lr=None``: the
        method's, scaled to the search length by :func:`scaled_arch_lr`).
      augment: random crop (and flip where the dataset allows) on training batches.
      progress, tensorboard, plots: outputs.
      max_steps: stop (with a checkpoint) after this many steps in total (for tests / budgets).
      compile_cache: persistent XLA cache directory, ``"off"``, or ``None`` (``DIFFNAS_COMPILE_CACHE``,
        else JAX's configured one, else ``$XDG_CACHE_HOME/diffnas_jax/xla``; see
        :mod:`diffnas_jax.search.compile_cache`).
      staged_step: when the estimator has a staged form (``implicit`` with CG or Neumann), run the
        step as separately compiled programs (gradients, one solver iteration, update) chained
        by a host loop instead of one program with the solver's ``while_loop`` (same step up to
        rounding; on XLA:CPU the fused loop compiles for minutes and runs its convolutions on a
        slow path). ``False``: always the one fused program. Not part of the fingerprint.
    """

    space: str = "nb201"
    method: str = "darts"
    hypergrad: str | None = None
    select: str = "argmax"
    dataset: str = "digits"
    data_dir: str | None = None
    data_seed: int = 0
    epochs: int = 25
    batch_size: int = 64
    seed: int = 0
    seeds: tuple[int, ...] | None = None
    devices: int = 1
    out: str = "runs/search"
    resume: bool = False
    checkpoint_every: int = 100
    channels: int | None = None
    layers: int | None = None
    arch_lr: float | None = None
    weight_lr: float | None = None
    augment: bool = False
    cost: str = "flops"
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    max_steps: int | None = None
    compile_cache: str | None = None
    staged_step: bool = True

    def __post_init__(self):
        from .._checks import check_choice

        check_choice("space", self.space, registry.list_spaces())
        check_choice("select", self.select, SELECTIONS)
        if self.cost not in ("flops", "params") and not (self.cost.endswith(".json") and os.path.isfile(self.cost)):
            raise ValueError(f"`cost` must be 'flops', 'params' or an existing latency table .json "
                             f"(from `diffnas profile`), got {self.cost!r}")
        for name in ("epochs", "batch_size", "devices"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        if self.batch_size % self.devices:
            raise ValueError(f"`batch_size` {self.batch_size} must be divisible by `devices` {self.devices}")
        for name in ("seed", "data_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"`{name}` must be an int >= 0, got {v!r}")
        for name in ("arch_lr", "weight_lr"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v < 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {v!r}")
        if self.hypergrad is not None:
            check_choice("hypergrad", self.hypergrad, HYPERGRADIENTS)
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"`max_steps` must be a positive int or None, got {self.max_steps!r}")
        if not isinstance(self.staged_step, bool):
            raise TypeError(f"`staged_step` must be a bool, got {type(self.staged_step).__name__}")
        if self.checkpoint_every < 0:
            raise ValueError(f"`checkpoint_every` must be >= 0, got {self.checkpoint_every}")
        if self.seeds is not None:
            seeds = tuple(int(s) for s in self.seeds)
            if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
                raise ValueError(f"`seeds` must be distinct ints >= 0, got {self.seeds!r}")
            object.__setattr__(self, "seeds", seeds)

    @property
    def seed_list(self) -> tuple[int, ...]:
        return self.seeds if self.seeds is not None else (self.seed,)

    @property
    def vmapped(self) -> bool:
        return self.seeds is not None

    def fingerprint(self) -> str:
        """Hash of the fields that define the trajectory (not outputs, resume or budgets)."""
        d = dataclasses.asdict(self)
        for k in _NOT_TRAJECTORY:
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


PAPER_SEARCH_TRAIN_SIZE = 25_000
"""Training images of a paper's search (CIFAR-10's 50,000 split in half for the bilevel problem)."""

MAX_SCALED_ARCH_LR = 3e-2
"""Ceiling of the scaled architecture lr (unless the paper's own is larger): on digits the margins
still grew at 3e-2 and oscillated at 1e-1 (``benchmarks/digits_quality.py``)."""


def scaled_arch_lr(method: Any, steps: int) -> float:
    """The method's architecture learning rate, scaled up so that a shorter search keeps the
    paper's architecture-step budget ``lr x steps``.

    Adam moves a logit by about ``lr`` per step, so DARTS' 3e-4 over its 50 x 391 = 19,550 CIFAR
    steps lets the logits travel ~6, but over the default digits search (275 steps) only ~0.08:
    the mixing weights end within 0.19-0.21 of uniform and the genotype is argmax over noise.
    The factor is ``paper steps / steps`` (never below 1, so longer searches keep the paper's lr)
    and the result at most :data:`MAX_SCALED_ARCH_LR`; both step counts exclude the warm-up. On the default digits search DARTS gets
    2.1e-2 (measured: mean margin between the chosen op and the runner-up 0.06-0.15 over three
    seeds, against 0.003-0.006 at 3e-4; ``benchmarks/digits_quality.py``).
    """
    lr = float(method.arch_lr)
    paper_steps = max(method.epochs - method.warmup_epochs, 1) * -(-PAPER_SEARCH_TRAIN_SIZE // method.batch_size)
    return max(lr, min(lr * paper_steps / max(int(steps), 1), MAX_SCALED_ARCH_LR))


def make_mesh(devices: int) -> jax.sharding.Mesh:
    """A 1-D mesh named ``"batch"`` over the first ``devices`` devices."""
    avail = jax.devices()
    if devices > len(avail):
        raise ValueError(f"`devices`={devices} but only {len(avail)} device(s) are visible "
                         f"({avail[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N")
    return jax.sharding.Mesh(np.array(avail[:devices]), ("batch",))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh | None, batch_axis: int = 0) -> Any:
    """Place every array of ``batch`` on ``mesh``, split along ``batch_axis`` (the rest replicated)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    P = jax.sharding.PartitionSpec
    sharding = jax.sharding.NamedSharding(mesh, P(*([None] * batch_axis + ["batch"])))
    if jax.process_count() > 1:
        # multi-host: every process holds the same global numpy batch (same seed) and feeds
        # only its own contiguous slice of the batch axis
        n, i = jax.process_count(), jax.process_index()

        def local(a):
            a = np.asarray(a)
            size = a.shape[batch_axis] // n
            part = np.take(a, np.arange(i * size, (i + 1) * size), axis=batch_axis)
            return jax.make_array_from_process_local_data(sharding, part, a.shape)

        return jax.tree.map(local, batch)
    return jax.tree.map(lambda a: jax.device_put(a, sharding), batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """Replicate ``tree`` on every device of ``mesh`` (weights, arch, optimizer states)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


@dataclasses.dataclass
class SearchSetup:
    """Everything :func:`run_search` builds before the loop (useful on its own in tests)."""

    config: SearchConfig
    dataset: Any
    method: Any
    space: SearchSpace
    relaxation: Callable
    hypergradient: Any
    weight_opt: Any
    arch_opt: Any
    step_fn: Callable            # pure step(state, bt, bv, key)
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    mesh: Any
    objective: Any = None        # the step's Objective (its state is part of SearchState)
    space_name: str | None = None  # a given space object's name (None: config.space)


def _resolve_with(factory, **context) -> Any:
    """Call a method's factory, adding the context kwargs its constructor accepts but were not set."""
    ctor = factory.resolve()
    if ctor is None:
        return None
    extra = {k: v for k, v in context.items() if k not in factory.defaults and _accepts(ctor, k)}
    return factory(**extra)


def build_search(config: SearchConfig, dataset: Any = None, space: SearchSpace | None = None) -> SearchSetup:
    """Load data and build space, relaxation, estimator, optimizers and the pure step.

    ``dataset`` / ``space`` replace the ones ``config`` names (e.g. a user-defined space from
    :func:`diffnas_jax.spaces.from_module`).
    """
    from diffnas_jax.data import load_dataset, num_batches
    from diffnas_jax.methods import Factory, get_method

    from .step import make_step

    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.data_seed)
    base = get_method(config.method)
    steps_per_epoch = min(num_batches(len(dataset.y_train), config.batch_size),
                          num_batches(len(dataset.y_val), config.batch_size))
    if steps_per_epoch < 1:
        raise ValueError(f"`batch_size` {config.batch_size} is larger than the train or val split of "
                         f"{dataset.name} ({len(dataset.y_train)} / {len(dataset.y_val)} examples)")
    total = steps_per_epoch * config.epochs
    # a paper's warm-up (e.g. PC-DARTS 15 of 50 epochs) keeps its fraction of the search
    warmup = int(round(base.warmup_epochs / base.epochs * config.epochs)) * steps_per_epoch
    overrides = {"epochs": config.epochs, "batch_size": config.batch_size,
                 "arch_lr": config.arch_lr if config.arch_lr is not None else scaled_arch_lr(base, total - warmup)}
    if config.weight_lr is not None:
        overrides["weight_lr"] = config.weight_lr
    method = get_method(config.method, **overrides)
    space_name = None if space is None else (getattr(space, "name", None) or type(space).__name__)
    if space is None:
        space = make_space(config.space, dataset.num_classes, channels=config.channels, layers=config.layers,
                           **method.space_kwargs)
    schedule = method.weight_schedule(total)
    context = {"total_steps": total, "steps_per_epoch": steps_per_epoch, "num_steps": total,
               "epochs": config.epochs}
    relaxation = _resolve_with(method.relaxation_factory, **context)
    hfac = method.hypergrad_factory if config.hypergrad is None else Factory.of("hypergrad", config.hypergrad)
    hypergradient = _resolve_with(hfac, eta=schedule, weight_decay=method.weight_weight_decay,
                                  momentum=method.weight_momentum, **context)
    from diffnas_jax.regularizers import as_objective

    term = _resolve_with(method.regularizer, **context) if method.regularizer.module else None
    if config.cost in ("flops", "params"):
        objective = as_objective(term, space=space, input_shape=dataset.image_shape, metric=config.cost)
    else:
        from diffnas_jax.cost import load_table

        objective = as_objective(term, space=space, table=load_table(config.cost))
    weight_opt = method.weight_optimizer(total)
    arch_opt = method.arch_optimizer()
    # the weight optimizer already clips (DARTS: 5)
    step_fn = make_step(space, relaxation, hypergradient, weight_opt, arch_opt, weight_grad_clip=None,
                        objective=objective)
    mesh = make_mesh(config.devices) if config.devices > 1 else None
    return SearchSetup(config, dataset, method, space, relaxation, hypergradient, weight_opt, arch_opt,
                       step_fn, steps_per_epoch, total, warmup, mesh, objective, space_name)


def init_state(setup: SearchSetup) -> Any:
    """The initial :class:`SearchState` (stacked over seeds when ``config.seeds`` is set)."""
    from .state import init_search_state

    cfg = setup.config
    x = jnp.asarray(setup.dataset.x_train[: max(2, min(cfg.batch_size, 8))])

    def one(seed_key):
        return init_search_state(seed_key, setup.space, x, setup.weight_opt, setup.arch_opt, setup.hypergradient,
                                 setup.objective)

    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 0) for s in cfg.seed_list])
    if cfg.vmapped:
        return jax.jit(jax.vmap(one))(keys)
    return jax.jit(one)(keys[0])


def make_jitted_step(setup: SearchSetup) -> Callable:
    """``jstep(state, batch_train, batch_val, keys, frozen) -> (state, metrics)``, jit-compiled.

    ``frozen`` (a traced bool) keeps the architecture and its optimizer state during a method's
    warm-up epochs, in the same compiled program. When the step has stages
    (:class:`~diffnas_jax.search.step.StepStages`) and ``config.staged_step`` is on, ``jstep`` is
    a :class:`StagedStep`: the stages jitted apart (vmapped, guarded and donating alike).
    """
    from .loop import with_finiteness_flags

    vmapped = setup.config.vmapped
    # a SearchSetup built by hand may hold any step function: no stages then
    stages = getattr(setup.step_fn, "stages", None) if setup.config.staged_step else None

    def freeze(new, state, frozen):
        keep = lambda n, o: jnp.where(frozen, o, n)  # noqa: E731
        return new.replace(arch=jax.tree.map(keep, new.arch, state.arch),
                           arch_opt_state=jax.tree.map(keep, new.arch_opt_state, state.arch_opt_state))

    if stages is None:
        # finite_* flags ride along with the metrics: the loop stops on the first non-finite step
        step = with_finiteness_flags(setup.step_fn)

        def guarded(state, bt, bv, key, frozen):
            new, metrics = step(state, bt, bv, key)
            return freeze(new, state, frozen), metrics

        if vmapped:
            guarded = jax.vmap(guarded, in_axes=(0, 0, 0, 0, None))
        return jax.jit(guarded, donate_argnums=(0,))

    finish = with_finiteness_flags(stages.finish)

    def guarded_finish(state, bt, bv, key, frozen, carry):
        new, metrics = finish(state, bt, bv, key, carry)
        return freeze(new, state, frozen), metrics

    def iterate(state, bt, bv, key, carry):
        carry = stages.iterate(state, bt, bv, key, carry)
        return carry, stages.converged(carry)

    prepare = stages.prepare
    if vmapped:
        prepare = jax.vmap(prepare)
        iterate = jax.vmap(iterate)
        guarded_finish = jax.vmap(guarded_finish, in_axes=(0, 0, 0, 0, None, 0))
    return StagedStep(jax.jit(prepare), jax.jit(iterate, donate_argnums=(4,)),
                      jax.jit(guarded_finish, donate_argnums=(0,)), stages.max_iterations)


@dataclasses.dataclass(frozen=True)
class StagedStep:
    """The search step as three compiled programs and the host loop that chains them.

    ``prepare(state, bt, bv, keys) -> carry``, ``iterate(state, bt, bv, keys, carry) -> (carry,
    converged)`` (run until every seed has converged, at most ``max_iterations`` times) and
    ``finish(state, bt, bv, keys, frozen, carry) -> (state, metrics)``; called like the fused
    ``jstep``. The carry never leaves the device; the host reads one bool per seed per iteration.
    """

    prepare: Callable
    iterate: Callable
    finish: Callable
    max_iterations: int

    def __call__(self, state, bt, bv, keys, frozen):
        carry = self.prepare(state, bt, bv, keys)
        for _ in range(self.max_iterations):
            carry, converged = self.iterate(state, bt, bv, keys, carry)
            if bool(np.all(jax.device_get(converged))):
                break
        return self.finish(state, bt, bv, keys, frozen, carry)

    def compile(self, args: tuple) -> tuple["StagedStep", dict]:
        """Lower the three programs for ``args`` (the ``jstep`` arguments) one after the other, then
        compile them concurrently; returns the compiled step and the tracing and XLA times.

        XLA compiles outside the GIL and, on the CPU, runs its HLO passes and kernel emission on
        one thread: two programs compiling at once use both cores of a 2-core machine (full-size
        DARTS implicit step: BUILD_NOTES section 5, round 8). ``xla_compile_s`` is the wall
        time of the concurrent compile; ``per_program`` gives each program's own."""
        state, bt, bv, keys, frozen = args
        traced = {}

        def lower(name, fn, *fargs):
            t0 = time.time()
            lowered = fn.lower(*fargs)
            traced[name] = time.time() - t0
            return lowered

        compiled, compile_s = {}, {}

        def compile_all(names):
            def one(name):
                t0 = time.time()
                compiled[name] = lowered[name].compile()
                compile_s[name] = time.time() - t0

            t0 = time.time()
            with xla_log_to_debug(), concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                for future in [pool.submit(one, name) for name in names]:
                    future.result()
            return time.time() - t0

        lowered = {"prepare": lower("prepare", self.prepare, state, bt, bv, keys)}
        wall = 0.0
        if _on_one_device((state, bt, bv)):
            # the carry's shapes as prepare leaves it: the next programs are lowered for those
            carry = lowered["prepare"].out_info
        else:
            # sharded over a mesh: the next programs take the carry's placement from the compiled
            # prepare
            wall += compile_all(["prepare"])
            carry = jax.tree.map(lambda o, sh: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sh),
                                 compiled["prepare"].out_info, compiled["prepare"].output_shardings)
        lowered["iterate"] = lower("iterate", self.iterate, state, bt, bv, keys, carry)
        lowered["finish"] = lower("finish", self.finish, state, bt, bv, keys, frozen, carry)
        # the largest program first, so the others fill the second core around it
        wall += compile_all([name for name in ("iterate", "prepare", "finish") if name not in compiled])
        return (StagedStep(compiled["prepare"], compiled["iterate"], compiled["finish"], self.max_iterations),
                {"trace_s": round(sum(traced.values()), 2), "xla_compile_s": round(wall, 2),
                 "programs": len(lowered),
                 "per_program": {k: {"trace_s": round(traced[k], 2), "xla_compile_s": round(compile_s[k], 2)}
                                 for k in lowered}})


def _on_one_device(tree: Any) -> bool:
    """Whether every array of ``tree`` lives on a single device (no mesh)."""
    return all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(tree) if hasattr(leaf, "sharding"))


def step_keys(config: SearchConfig, step: int) -> jax.Array:
    """The step's PRNG key(s): a pure function of ``(seed, step)``."""
    keys = [jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 1), step) for s in config.seed_list]
    return jnp.stack(keys) if config.vmapped else keys[0]


def _epoch_iter(setup: SearchSetup, epoch: int, start: int):
    """``(batch_train, batch_val)`` numpy pairs of one epoch (stacked over seeds when vmapped)."""
    from diffnas_jax.data import epoch_batches

    cfg, ds = setup.config, setup.dataset
    iters = []
    for s in cfg.seed_list:
        tr = epoch_batches(ds.x_train, ds.y_train, cfg.batch_size, seed=s, epoch=2 * epoch, start=start)
        va = epoch_batches(ds.x_val, ds.y_val, cfg.batch_size, seed=s, epoch=2 * epoch + 1, start=start)
        iters.append(zip(tr, va))
    for b in range(start, setup.steps_per_epoch):
        pairs = [next(it) for it in iters]
        if cfg.vmapped:
            yield tuple(tuple(np.stack([p[i][j] for p in pairs]) for j in range(2)) for i in range(2))
        else:
            yield pairs[0]


def _augment_fn(setup: SearchSetup):
    if not setup.config.augment:
        return None
    from diffnas_jax.data import random_crop_flip

    pad = max(1, setup.dataset.image_shape[0] // 8)
    flip = bool(setup.dataset.flip)
    fn = jax.jit(lambda k, x: random_crop_flip(k, x, pad, flip))
    return fn


# ---------------------------------------------------------------------------------------------
# Output folder bookkeeping
# ---------------------------------------------------------------------------------------------
def _versions() -> dict:
    import flax
    import optax

    import diffnas_jax

    return {"diffnas_jax": diffnas_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "backend": jax.default_backend()}


def _prepare_out(config: SearchConfig) -> pathlib.Path:
    out = pathlib.Path(config.out)
    ckpts = list_checkpoints(out / "checkpoints")
    run_file = out / "run.json"
    if config.resume:
        if not run_file.is_file():
            if ckpts:
                raise CheckpointError(f"{run_file} is missing: cannot check that {out} holds this run")
            return out
        try:
            stored = json.loads(run_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{run_file} is not valid JSON ({e}): cannot check that {out} holds this run"
                                  ) from None
        if stored.get("fingerprint") != config.fingerprint():
            diff = {k: (stored["config"].get(k), v) for k, v in to_jsonable(dataclasses.asdict(config)).items()
                    if k not in _NOT_TRAJECTORY and stored["config"].get(k) != v}
            raise RunInUseError(f"--resume: {out} holds a run with another configuration "
                                f"(stored vs given: {diff}); resume with the same flags or use another --out")
        return out
    if ckpts or (out / "result.json").exists():
        raise RunInUseError(f"{out} already holds another run ({'checkpoints' if ckpts else 'result.json'}); "
                            "pass --resume to continue it or choose another --out")
    return out


class _SignalGuard:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (so it can checkpoint)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
MIX_SAMPLES = 16
"""Samples averaged for the logged mixing weights of a stochastic relaxation (GDAS, SNAS, DrNAS)."""


def _mix_fn(setup: SearchSetup) -> Callable:
    """``mix(arch, step) -> {leaf name: weights}``: what the relaxation returns for ``arch``.

    Not ``softmax(arch)``: FairDARTS' sigmoids, sparsemax and Max-W give other weights. For a
    stochastic relaxation it is the mean of :data:`MIX_SAMPLES` draws with fixed keys (an
    estimate of the expected mix; exact for deterministic relaxations, whose draws coincide).
    """
    from ..spaces.base import is_passthrough_path, leaf_name

    relax = setup.relaxation
    keys = jax.random.split(jax.random.key(0), MIX_SAMPLES)

    def one(arch, step):
        if relax is None:
            return jax.tree.map(lambda a: jax.nn.softmax(a.astype(jnp.float32), -1), arch)
        mixes = jax.vmap(lambda k: relax(arch, k, step))(keys)
        return jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32), 0), mixes)

    fn = jax.jit(jax.vmap(one, in_axes=(0, None)) if setup.config.vmapped else one)

    def mix(arch, step):
        out = {}
        for path, v in jax.tree_util.tree_leaves_with_path(jax.device_get(fn(arch, jnp.asarray(step)))):
            if is_passthrough_path(path):
                continue
            out[leaf_name(path)] = np.asarray(v)
        return out

    return mix


def _index_seed(tree: Any, i: int, vmapped: bool) -> Any:
    return jax.tree.map(lambda a: a[i], tree) if vmapped else tree


def _select(setup: SearchSetup, state: Any, seed_index: int) -> tuple[Any, dict]:
    """The genotype of one seed's search, by the configured selector."""
    from diffnas_jax import select as sel

    cfg = setup.config
    st = jax.device_get(_index_seed(state, seed_index, cfg.vmapped))
    selector = setup.method.selector
    use_pt = cfg.select == "perturbation" or selector.name == "perturbation"
    if not use_pt:
        if selector.module and selector.name != "argmax":
            res = selector.bind()(setup.space, st.arch)
            return getattr(res, "genotype", res), {"selector": repr(selector)}
        return sel.argmax(setup.space, st.arch), {"selector": "argmax"}
    from diffnas_jax.data import epoch_batches

    ds = setup.dataset
    n = len(ds.y_val)
    size = n // -(-n // 256)  # equal batches of at most 256: one compiled shape
    batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in
               epoch_batches(ds.x_val, ds.y_val, size, seed=0, epoch=0, shuffle=False)]
    res = sel.perturbation(setup.space, st.weights, st.model_state, st.arch, setup.relaxation, batches,
                           key=jax.random.key(cfg.seed_list[seed_index]), step=int(st.step), train=True)
    return res.genotype, {"selector": "perturbation", "base_accuracy": float(res.base_accuracy)}


def _stored_result(out: pathlib.Path) -> dict | None:
    path = out / "result.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); move it away to recompute the result") from None


def _epoch_records_before(logger_path: pathlib.Path, start_step: int, spe: int, total: int) -> dict:
    """The running metrics of the epoch a resumed run continues (or, at the end, the last epoch)."""
    if start_step % spe:
        epoch = start_step // spe
    elif start_step == total and start_step:  # crashed after the last checkpoint: final metrics
        epoch = start_step // spe - 1
    else:
        return {}
    acc: dict[str, list] = {}
    for r in read_jsonl(logger_path):
        if r.get("event") == "step" and r["epoch"] == epoch and r["step"] <= start_step:
            for k, v in r.items():
                if k not in ("event", "step", "epoch", NON_FINITE_KEY):
                    acc.setdefault(k, []).append(np.asarray(v, np.float64))
    return acc


def _compile(jstep: Callable, args: tuple) -> tuple[Callable, dict]:
    """Compile the step ahead of the loop, saying so, so the progress ETA counts steps only.

    Tracing (Python, every run) and XLA compilation (cached on disk) are timed apart: the
    persistent cache removes the second part only.
    """
    hint = host_memory.advice(jax.default_backend())
    if hint:
        print(hint, file=sys.stderr, flush=True)
    print("compiling the search step (first run only; cached afterwards) ...", end="", file=sys.stderr,
          flush=True)
    if isinstance(jstep, StagedStep):
        compiled, times = jstep.compile(args)
        print(f" {times['trace_s'] + times['xla_compile_s']:.1f} s (tracing {times['trace_s']:.1f} s, "
              f"XLA {times['xla_compile_s']:.1f} s; {times['programs']} programs)", file=sys.stderr, flush=True)
        return compiled, times
    t0 = time.time()
    lowered = jstep.lower(*args)
    t1 = time.time()
    with xla_log_to_debug():  # XLA's "Very slow compile?" alarm: a DEBUG log line, not terminal noise
        compiled = lowered.compile()
    t2 = time.time()
    print(f" {t2 - t0:.1f} s (tracing {t1 - t0:.1f} s, XLA {t2 - t1:.1f} s)", file=sys.stderr, flush=True)
    return compiled, {"trace_s": round(t1 - t0, 2), "xla_compile_s": round(t2 - t1, 2)}


def search_to_dir(config: SearchConfig, *, dataset: Any = None, space: SearchSpace | None = None,
                  on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) a search with all its files in ``config.out``; return ``result.json``'s content.

    The loop itself is :func:`diffnas_jax.search.loop.run_search`; this function adds the I/O
    around it: data loading, ``run.json``, ``metrics.jsonl``, checkpoints, signals, progress bar,
    the final selection and ``result.json``.

    Args:
      config: the :class:`SearchConfig`.
      dataset: a preloaded :class:`diffnas_jax.data.Dataset` (default: load ``config.dataset``).
      space: a search-space object replacing ``config.space`` (e.g. a user-defined space).
      on_step: called as ``on_step(step, metrics)`` after each finite step (host-side; tests use it).

    Returns:
      the result with ``"status"``:

      - ``"complete"``: ``result.json`` written (also when ``resume`` finds a finished run: then
        the stored result is returned unchanged, with ``"already_complete": True``);
      - ``"interrupted"``: stopped by SIGINT/SIGTERM or ``max_steps``; a checkpoint is written,
        no ``result.json``;
      - ``"diverged"``: a loss, the weights, BatchNorm statistics or the architecture became
        non-finite; ``result.json`` records step and quantity, no checkpoint of the non-finite
        state is written (the last finite one is kept).

    Raises:
      RunInUseError: ``out`` holds another run and ``resume`` is false (or the configs differ).
      CheckpointError: the newest checkpoint is corrupt or truncated (names the file);
        :class:`~diffnas_jax.search.checkpoint.CheckpointWriteError` when one cannot be written.
    """
    from .loop import run_search as run_loop

    t_start = time.time()
    out = _prepare_out(config)
    if config.resume:
        stored = _stored_result(out)
        if stored is not None and stored.get("status") in ("complete", "diverged"):
            return {**stored, "already_complete": True}
    cache_dir = enable_compile_cache(config.compile_cache)
    setup = build_search(config, dataset, space)
    out.mkdir(parents=True, exist_ok=True)  # after the data and flags are known good: no empty folders
    cfg = setup.config
    spe, total = setup.steps_per_epoch, setup.total_steps
    ckpt_dir = out / "checkpoints"
    state = init_state(setup)
    start_step, elapsed_before = 0, 0.0
    latest = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if latest is not None:
        state, meta = restore_checkpoint(latest, state)
        if meta.get("fingerprint") != cfg.fingerprint():
            raise RunInUseError(f"checkpoint {latest} belongs to another configuration")
        start_step = int(meta["step"])
        elapsed_before = float(meta.get("elapsed_s", 0.0))
    write_json(out / "run.json", {"fingerprint": cfg.fingerprint(), "config": dataclasses.asdict(cfg)})
    state = replicate(state, setup.mesh)
    logger = MetricsLogger(out, tensorboard=cfg.tensorboard)
    logger.truncate_after(start_step)
    # the epoch's running means continue from the records of the steps before the checkpoint
    epoch_acc = _epoch_records_before(logger.path, start_step, spe, total)
    mix_of = _mix_fn(setup)
    jstep = make_jitted_step(setup)
    augment = _augment_fn(setup)
    batch_axis = 1 if cfg.vmapped else 0
    stop_at = total if cfg.max_steps is None else min(total, cfg.max_steps)
    meta_base = {"fingerprint": cfg.fingerprint(), "steps_per_epoch": spe}

    def checkpoint(step_no, st):
        save_checkpoint(ckpt_dir, step_no, st, {**meta_base, "epoch": step_no // spe,
                                                "elapsed_s": elapsed_before + time.time() - t_loop})

    def batches():
        for epoch in range(start_step // spe, cfg.epochs):
            first = start_step - epoch * spe if epoch == start_step // spe else 0
            yield from _epoch_iter(setup, epoch, first)

    def device_args(state, batch, i):
        bt, bv = batch
        if augment is not None:
            ka = jax.random.fold_in(jax.random.key(cfg.seed_list[0] + 7919), i)
            bt = (np.asarray(augment(ka, jnp.asarray(bt[0].reshape((-1,) + bt[0].shape[-3:])))
                             ).reshape(bt[0].shape), bt[1])
        return (state, shard_batch(bt, setup.mesh, batch_axis), shard_batch(bv, setup.mesh, batch_axis),
                step_keys(cfg, i), jnp.asarray(i < setup.warmup_steps))

    it = itertools.islice(batches(), max(0, stop_at - start_step))
    first_batch = next(it, None)
    compile_info = {"compile_cache": str(cache_dir) if cache_dir is not None else None}
    if first_batch is not None:
        jstep, times = _compile(jstep, device_args(state, first_batch, start_step))
        compile_info.update(times)
        it = itertools.chain([first_batch], it)
    t_loop = time.time()  # search time counts steps, not the compilation above

    def step(state, batch, i):
        return jstep(*device_args(state, batch, i))

    decision = {}

    def log_step(info):
        if (info.step - 1) % spe == 0:
            epoch_acc.clear()
        m = {k: v.astype(np.float64) for k, v in info.metrics.items()}
        for k, v in m.items():
            epoch_acc.setdefault(k, []).append(v)
        logger.log({"event": "step", "step": info.step, "epoch": (info.step - 1) // spe, **m})
        if info.step % spe == 0:
            mix = mix_of(info.state.arch, info.step)
            decision.update(_decisions(mix, cfg))
            logger.log({"event": "epoch", "step": info.step, "epoch": (info.step - 1) // spe,
                        **{k: np.mean(np.stack(v), axis=0) for k, v in epoch_acc.items()}, "mix": mix,
                        "mean_margin": decision["mean_margin"], "mean_entropy": decision["mean_entropy"]})
        if on_step is not None:
            on_step(info.step, m)

    def save_at_cadence(info):
        if cfg.checkpoint_every and info.step % cfg.checkpoint_every == 0 and info.step < total:
            checkpoint(info.step, info.state)

    callbacks = [log_step, save_at_cadence]
    bar = None
    if cfg.progress and first_batch is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

        def show(info):
            bar.set_description(f"epoch {(info.step - 1) // spe + 1}/{cfg.epochs}")
            m = info.metrics
            post = {"loss": m["train_loss"], "val_loss": m["val_loss"], "acc": m["train_acc"], "val_acc": m["val_acc"]}
            if "temperature" in m:
                post["tau"] = m["temperature"]
            if decision:
                post["margin"] = decision["mean_margin"]
                post["H"] = decision["mean_entropy"]
            bar.set_postfix({k: f"{float(np.mean(v)):.3g}" for k, v in post.items()}, refresh=False)
            bar.update(1)

        callbacks.append(show)
    try:
        with _SignalGuard() as guard:
            res = run_loop(step, state, it, start_step=start_step, callbacks=callbacks,
                           should_stop=lambda: guard.signum is not None)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    state, step_no = res.state, res.step
    if res.status == "diverged":
        return _diverged(setup, out, res, latest_checkpoint(ckpt_dir))
    if step_no < total:
        interrupted = ("signal " + signal.Signals(guard.signum).name) if guard.signum is not None else "max_steps"
        checkpoint(step_no, state)
        print(f"search stopped by {interrupted} at step {step_no}/{total}; checkpoint written to "
              f"{ckpt_dir}; continue with --resume", file=sys.stderr)
        return {"status": "interrupted", "reason": interrupted, "step": step_no, "out": str(out)}
    search_time = elapsed_before + time.time() - t_loop
    checkpoint(step_no, state)
    return _finish(setup, state, out, search_time, time.time() - t_start, epoch_acc, mix_of, compile_info)


run_search = search_to_dir
"""Deprecated name of :func:`search_to_dir` (the library loop is :func:`diffnas_jax.search.loop.run_search`)."""


def _decisions(mix: dict, cfg: SearchConfig) -> dict:
    """:func:`~diffnas_jax.search.decision.summarize_decisions` of the mix (mean over seeds when vmapped)."""
    if not cfg.vmapped:
        return summarize_decisions(mix)
    per = [summarize_decisions({k: v[i] for k, v in mix.items()}) for i in range(len(cfg.seed_list))]
    return {"mean_margin": float(np.mean([p["mean_margin"] for p in per])),
            "mean_entropy": float(np.mean([p["mean_entropy"] for p in per]))}


def _run_record(setup: SearchSetup) -> dict:
    cfg = setup.config
    # the method's paper default space (e.g. "darts") would read as this run's space
    method = {k: v for k, v in setup.method.describe().items() if k != "default_space"}
    return {"space": cfg.space if setup.space_name is None else setup.space_name,
            "method": method,
            "hypergradient": getattr(setup.hypergradient, "name", str(setup.hypergradient)),
            "steps": setup.total_steps, "steps_per_epoch": setup.steps_per_epoch,
            "dataset": setup.dataset.summary(), "config": dataclasses.asdict(cfg), "versions": _versions()}


def _diverged(setup: SearchSetup, out: pathlib.Path, res, last_ckpt) -> dict:
    d = res.divergence
    message = d.message(setup.config.seed_list if setup.config.vmapped else None)
    result = {"status": "diverged", "message": message, "step": d.step, "quantity": d.quantity,
              "seeds": [setup.config.seed_list[i] for i in d.seeds] if d.seeds else None,
              "metrics_at_divergence": res.metrics,
              "last_checkpoint": str(last_ckpt) if last_ckpt is not None else None, **_run_record(setup)}
    write_json(out / "result.json", result)
    return json.loads((out / "result.json").read_text())


def _finish(setup: SearchSetup, state: Any, out: pathlib.Path, search_time: float, wall: float,
            epoch_acc: dict, mix_of: Callable, compile_info: dict | None = None) -> dict:
    cfg = setup.config
    host = jax.device_get(state)
    mix_all = mix_of(host.arch, int(np.max(host.step)))
    seeds, objects = [], []
    for i, seed in enumerate(cfg.seed_list):
        genotype, sel_info = _select(setup, state, i)
        objects.append(genotype)
        arch = _index_seed(host.arch, i, cfg.vmapped)
        mix = {k: (v[i] if cfg.vmapped else v) for k, v in mix_all.items()}
        final = {k: float(np.mean(np.stack(v), axis=0)[i] if cfg.vmapped else np.mean(v))
                 for k, v in epoch_acc.items()}
        decision = summarize_decisions(mix)
        seeds.append({"seed": seed, "genotype": str(genotype), "selection": sel_info,
                      "arch": arch, "mix": mix, "decision": decision, "final_metrics": final})
        if not decision["decided"]:
            warnings.warn(f"seed {seed}: the search ended undecided: mean margin {decision['mean_margin']:.3f} "
                          f"< {decision['threshold']} between the chosen op and the runner-up "
                          f"({decision['undecided_edges']} of {decision['num_edges']} edges below it); "
                          "the genotype is close to an argmax over near-ties. Search longer or raise the "
                          "architecture learning rate (--epochs, --arch-lr).", UndecidedSearchWarning, stacklevel=3)
    w0 = _index_seed(host.weights, 0, cfg.vmapped)
    result = {
        "status": "complete",
        "genotype": seeds[0]["genotype"] if len(seeds) == 1 else [s["genotype"] for s in seeds],
        "seeds": seeds,
        "decided": all(s["decision"]["decided"] for s in seeds),
        "search_time_s": round(search_time, 2), "wall_time_s": round(wall, 2), "compile": compile_info or {},
        "supernet_params": int(sum(np.prod(np.shape(a)) for a in jax.tree.leaves(w0))),
        **_run_record(setup),
    }
    if cfg.plots:
        result["plots"] = write_plots(setup, out, seeds, objects)
    write_json(out / "result.json", result)
    return json.loads((out / "result.json").read_text())


class UndecidedSearchWarning(UserWarning):
    """A search ended with mixing weights too close to call (see :mod:`diffnas_jax.search.decision`)."""


def write_plots(setup: SearchSetup, out: pathlib.Path, seeds: Sequence[dict], genotypes: Sequence[Any]) -> list[str]:
    """``cell[_seedS].png`` of each genotype and ``arch_weights[_seedS].png`` from metrics.jsonl."""
    from diffnas_jax import viz

    cfg = setup.config
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "epoch"]
    paths = []
    for i, (s, genotype) in enumerate(zip(seeds, genotypes)):
        suffix = f"_seed{s['seed']}" if cfg.vmapped else ""
        try:
            viz.plot_genotype(genotype, out / f"cell{suffix}.png",
                              title=f"{cfg.method} on {setup.dataset.name}: {cfg.space} cell")
            paths.append(out / f"cell{suffix}.png")
        except (TypeError, ValueError) as e:  # a space without a drawable genotype
            print(f"warning: no cell plot ({e})", file=sys.stderr)
        if records:
            steps = [r["step"] for r in records]
            hist = {k: np.stack([np.asarray(r["mix"][k])[i] if cfg.vmapped else np.asarray(r["mix"][k])
                                 for r in records]) for k in records[0]["mix"]}
            viz.plot_arch_history(steps, hist, out / f"arch_weights{suffix}.png", space=setup.space,
                                  title=f"mixing weights ({cfg.method}, seed {s['seed']})")
            paths.append(out / f"arch_weights{suffix}.png")
    return [str(p) for p in paths]
