"""The search loop as a library function: batches in, state and metrics out, no files.

:func:`run_search` calls a (jit-compiled) step over an iterator of batches, checks on the host
that every step stayed finite, and hands each finite step to callbacks (checkpointing, logging,
progress, user hooks). It writes nothing itself, so the file driver
(:func:`diffnas_jax.search.driver.search_to_dir`), the benchmarks and notebooks share one loop.

Divergence is checked at every step at no extra cost: :func:`with_finiteness_flags` makes the
compiled step also return ``finite_*`` booleans (an ``isfinite`` reduction over the weights, the
BatchNorm statistics and the architecture, fused into the same program) next to the losses the
step already returns; the host reads them with the metrics it fetches anyway. A non-finite
step is never passed to the callbacks, so no checkpoint ever holds a non-finite state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["StepInfo", "Divergence", "LoopResult", "run_search", "with_finiteness_flags", "FINITE_FLAGS"]

# flag name -> what it covers, for the one-line divergence message
FINITE_FLAGS = {"finite_weights": "supernet weights", "finite_model_state": "BatchNorm statistics",
                "finite_arch": "architecture parameters"}


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a callback sees after a finite step.

    Attributes:
      step: number of completed steps (1 after the first).
      state: the state after the step (on device; do not keep it across steps when the step
        donates its input).
      metrics: the step's metrics on the host (numpy; per seed when the step is vmapped).
    """

    step: int
    state: Any
    metrics: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Where a search stopped being finite."""

    step: int
    quantity: str
    seeds: tuple[int, ...] = ()   # indices along the vmapped seed axis (empty: not vmapped)

    def message(self, seed_names: Sequence[int] | None = None) -> str:
        who = ""
        if self.seeds:
            names = [seed_names[i] if seed_names is not None else i for i in self.seeds]
            who = f" (seed{'s' if len(names) > 1 else ''} {', '.join(map(str, names))})"
        return f"search diverged at step {self.step}: {self.quantity} became non-finite{who}"


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """``status``: ``"complete"`` (batches exhausted), ``"stopped"`` (``should_stop``) or
    ``"diverged"`` (then ``state`` is the non-finite one and ``divergence`` says where)."""

    state: Any
    step: int
    status: str
    metrics: dict[str, np.ndarray] | None = None
    divergence: Divergence | None = None


def _all_finite(tree: Any) -> jax.Array:
    # one reduction over all leaves: a reduction per leaf was one compiled kernel per leaf
    # (hundreds in a supernet's state), a tenth of the search step's XLA compile time
    leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    dtype = jnp.result_type(*leaves)
    return jnp.all(jnp.isfinite(jnp.concatenate([x.astype(dtype) for x in leaves])))


def with_finiteness_flags(step: Callable) -> Callable:
    """Wrap ``step(state, *args) -> (state, metrics)`` to add :data:`FINITE_FLAGS` to ``metrics``.

    The new state must have ``weights``, ``model_state`` and ``arch`` (a
    :class:`~diffnas_jax.search.state.SearchState`). Traceable: use inside ``jit`` / ``vmap``.
    """
    def wrapped(state, *args, **kwargs):
        new, metrics = step(state, *args, **kwargs)
        flags = {"finite_weights": _all_finite(new.weights), "finite_model_state": _all_finite(new.model_state),
                 "finite_arch": _all_finite(new.arch)}
        return new, {**metrics, **flags}

    return wrapped


def _find_divergence(step_no: int, metrics: dict[str, np.ndarray]) -> Divergence | None:
    bad = None
    # losses first: they name the cause best (a NaN loss also makes entropies and norms NaN)
    for k, v in sorted(metrics.items(), key=lambda kv: ("loss" not in kv[0], kv[0])):
        if k in FINITE_FLAGS or v.dtype.kind not in "fc":
            continue
        if not np.all(np.isfinite(v)):
            bad = (k, v.ndim > 0 and ~np.isfinite(v).reshape(v.shape[0], -1).all(-1))
            break
    if bad is None:
        for k, what in FINITE_FLAGS.items():
            if k in metrics and not np.all(metrics[k]):
                bad = (what, metrics[k].ndim > 0 and ~metrics[k].astype(bool))
                break
    if bad is None:
        return None
    name, per_seed = bad
    seeds = tuple(int(i) for i in np.flatnonzero(per_seed)) if per_seed is not False else ()
    return Divergence(step_no, name, seeds)


def run_search(step: Callable[[Any, Any, int], tuple[Any, Any]], state: Any, batches: Iterable[Any], *,
               start_step: int = 0, callbacks: Sequence[Callable[[StepInfo], None]] = (),
               should_stop: Callable[[], bool] | None = None) -> LoopResult:
    """Run a search: ``state, metrics = step(state, batch, i)`` for each ``batch`` of ``batches``.

    Args:
      step: ``step(state, batch, i) -> (state, metrics)`` where ``i`` is the number of steps done
        before this one (for PRNG keys and schedules). Wrap a state step with
        :func:`with_finiteness_flags` so diverged parameters are caught, not only losses.
      state: the initial (or restored) state.
      batches: an iterable of batches (e.g. ``(batch_train, batch_val)`` pairs); its length is
        the number of steps to run.
      start_step: steps already done (when resuming).
      callbacks: each called as ``cb(StepInfo)`` after every finite step, in order
        (checkpointing, logging, progress bars).
      should_stop: checked after each step; ``True`` stops the loop with status ``"stopped"``.

    Returns:
      A :class:`LoopResult`. A step whose metrics hold a non-finite float or a false
      ``finite_*`` flag ends the loop with status ``"diverged"`` before any callback sees it.
    """
    step_no, metrics = start_step, None
    for batch in batches:
        state, dev_metrics = step(state, batch, step_no)
        step_no += 1
        metrics = {k: np.asarray(v) for k, v in jax.device_get(dev_metrics).items()}
        div = _find_divergence(step_no, metrics)
        if div is not None:
            return LoopResult(state, step_no, "diverged", metrics, div)
        metrics = {k: v for k, v in metrics.items() if k not in FINITE_FLAGS}
        info = StepInfo(step_no, state, metrics)
        for cb in callbacks:
            cb(info)
        if should_stop is not None and should_stop():
            return LoopResult(state, step_no, "stopped", metrics)
    return LoopResult(state, step_no, "complete", metrics)
