"""What every hypergradient estimator shares: its result type, its calling convention, and the
second-order products (Hessian- and mixed-Hessian-vector products) they are all built from.

Calling convention. An estimator ``est`` is a :class:`Hypergradient`:

- ``est(loss_train, loss_val, weights, arch, batch_train, batch_val) -> d_arch`` (a pytree like
  ``arch``), with ``loss_*(weights, arch, batch) -> scalar``;
- ``est.compute(..., *, has_aux=False, state=None, momentum_buffer=None, step=0)
  -> HypergradResult``: the full form used by :func:`diffnas_jax.search.make_step`. With
  ``has_aux=True`` the losses return ``(scalar, aux)`` (e.g. ``aux`` = new BatchNorm statistics);
  the result also carries ``weight_grad``, the training gradient d L_train / d w at the current
  ``(weights, arch)`` on ``batch_train`` when the estimator computed it anyway, so the weight
  step can reuse it instead of paying for another backward pass (``None`` otherwise).
- ``est.init(weights) -> state``: estimator state (RARTS' second copy of the weights; ``()`` for
  the others), threaded by the caller like an optax state.
- ``est.staged``: ``None``, or a :class:`Staged` form of an estimator built around a solver loop
  (``implicit`` with CG or Neumann): ``prepare -> carry``, ``iterate(carry) -> carry`` (one
  solver iteration, a no-op once converged) and ``finish(carry) -> HypergradResult``, so that a
  host loop can run them as separately compiled programs (``est.bind`` builds their input,
  ``est.compute_staged`` chains them). On XLA:CPU the products inside a compiled ``while_loop``
  run through a slow convolution emitter and the fused loop compiles for minutes; the stages keep
  every product outside a loop (issue #20, BUILD_NOTES section 5, round 6).

The second-order products use ``jax.linearize`` of ``jax.grad`` (forward-over-reverse, i.e.
``jax.jvp`` of ``jax.grad`` with the primal pass shared): one linearization at ``(w, arch)`` gives
the training gradient itself, and every later product ``v -> (H_ww v, H_aw v)`` costs only the
tangent pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
Loss = Callable[[PyTree, PyTree, Any], Any]


class HypergradResult(NamedTuple):
    """Output of :meth:`Hypergradient.compute` (a pytree; ``None`` fields are absent values).

    Attributes:
      d_arch: the hypergradient, a pytree like ``arch``.
      weight_grad: d L_train / d w at the current ``(weights, arch)`` on ``batch_train`` (RARTS:
        the coupled weight gradient of its relaxed objective), or ``None`` if not computed.
      train_loss, train_aux: L_train and its aux at the current ``(weights, arch)`` when computed.
      val_loss, val_aux: L_val and its aux where the estimator evaluated it (the current weights
        for first-order and implicit, the virtual weights ``w'`` for unrolled).
      state: the estimator's new state (``()`` for stateless estimators).
    """

    d_arch: PyTree
    weight_grad: PyTree | None = None
    train_loss: Any = None
    train_aux: Any = None
    val_loss: Any = None
    val_aux: Any = None
    state: PyTree = ()


class Context(NamedTuple):
    """Extra inputs an estimator may use (ignored by those that do not need them)."""

    state: PyTree
    momentum_buffer: PyTree | None
    step: Any


class Problem(NamedTuple):
    """One bilevel problem instance, the input of every stage of a :class:`Staged` estimator.

    Built by :meth:`Hypergradient.bind` (inside each compiled stage: the losses are closures and
    never cross a program boundary). ``loss_train`` / ``loss_val`` return ``(value, aux)``.
    """

    loss_train: Callable[..., tuple[Any, Any]]
    loss_val: Callable[..., tuple[Any, Any]]
    weights: PyTree
    arch: PyTree
    batch_train: Any
    batch_val: Any
    ctx: Context


class Staged(NamedTuple):
    """An estimator's solver loop unrolled into stages a host loop chains (optax-style: pure
    functions; the carry is a pytree of arrays).

    Attributes:
      prepare: ``Problem -> carry`` (the gradients the solve needs, the solver's initial state).
      iterate: ``(Problem, carry) -> carry``, one solver iteration; once ``converged(carry)`` it
        returns ``carry`` unchanged, so ``max_iterations`` calls equal the fused ``while_loop``
        with its tolerance, and a host may stop as soon as ``converged`` holds (which is never
        before the first call: an iteration may fill in what its products compute anyway, e.g.
        the training gradient, the primal of a Hessian-vector product).
      finish: ``(Problem, carry) -> HypergradResult``, equal to the fused ``impl``'s result.
      converged: ``carry -> bool`` (a scalar array).
      max_iterations: iterations after which ``converged`` always holds.
    """

    prepare: Callable[[Problem], PyTree]
    iterate: Callable[[Problem, PyTree], PyTree]
    finish: Callable[[Problem, PyTree], HypergradResult]
    converged: Callable[[PyTree], jax.Array]
    max_iterations: int


def _no_state(weights: PyTree) -> PyTree:
    del weights
    return ()


@dataclasses.dataclass(frozen=True)
class Hypergradient:
    """A hypergradient estimator (see the module docstring for the calling convention).

    Attributes:
      name: the constructor's name (``"first_order"``, ``"unrolled"``, ...).
      impl: ``impl(loss_train, loss_val, weights, arch, batch_train, batch_val, ctx)`` where both
        losses return ``(value, aux)``; returns a :class:`HypergradResult`.
      init: ``weights -> state``.
      options: the constructor's options, for printing and hashing.
      staged: the same estimator as separately runnable stages (:class:`Staged`), or ``None``.
    """

    name: str
    impl: Callable[..., HypergradResult] = dataclasses.field(repr=False)
    init: Callable[[PyTree], PyTree] = dataclasses.field(default=_no_state, repr=False)
    options: tuple = ()
    staged: Staged | None = dataclasses.field(default=None, repr=False, compare=False)

    def bind(self, loss_train: Loss, loss_val: Loss, weights: PyTree, arch: PyTree, batch_train: Any,
             batch_val: Any, *, has_aux: bool = False, state: PyTree = None,
             momentum_buffer: PyTree | None = None, step: Any = 0) -> Problem:
        """The :class:`Problem` the stages of :attr:`staged` take (arguments as :meth:`compute`)."""
        if state is None:
            state = self.init(weights)
        return Problem(with_aux(loss_train, has_aux), with_aux(loss_val, has_aux), weights, arch,
                       batch_train, batch_val, Context(state, momentum_buffer, step))

    def compute_staged(self, loss_train: Loss, loss_val: Loss, weights: PyTree, arch: PyTree,
                       batch_train: Any, batch_val: Any, *, has_aux: bool = False, state: PyTree = None,
                       momentum_buffer: PyTree | None = None, step: Any = 0) -> HypergradResult:
        """:meth:`compute` through the stages: ``prepare``, ``max_iterations`` times ``iterate``,
        ``finish`` (each may be jitted apart by the caller; here they run as given).

        Raises:
          ValueError: the estimator has no staged form (``staged is None``).
        """
        if self.staged is None:
            raise ValueError(f"hypergradient {self.name!r} with {dict(self.options)} has no staged form")
        problem = self.bind(loss_train, loss_val, weights, arch, batch_train, batch_val, has_aux=has_aux,
                            state=state, momentum_buffer=momentum_buffer, step=step)
        carry = self.staged.prepare(problem)
        for _ in range(self.staged.max_iterations):
            carry = self.staged.iterate(problem, carry)
        res = self.staged.finish(problem, carry)
        if not has_aux:
            res = res._replace(train_aux=None, val_aux=None)
        return res

    def compute(self, loss_train: Loss, loss_val: Loss, weights: PyTree, arch: PyTree,
                batch_train: Any, batch_val: Any, *, has_aux: bool = False, state: PyTree = None,
                momentum_buffer: PyTree | None = None, step: Any = 0) -> HypergradResult:
        """The full result; ``has_aux=True`` when the losses return ``(scalar, aux)``."""
        lt, lv = with_aux(loss_train, has_aux), with_aux(loss_val, has_aux)
        if state is None:
            state = self.init(weights)
        res = self.impl(lt, lv, weights, arch, batch_train, batch_val,
                        Context(state, momentum_buffer, step))
        if not has_aux:
            res = res._replace(train_aux=None, val_aux=None)
        return res

    def __call__(self, loss_train: Loss, loss_val: Loss, weights: PyTree, arch: PyTree,
                 batch_train: Any, batch_val: Any) -> PyTree:
        """``d_arch``, a pytree like ``arch``."""
        return self.compute(loss_train, loss_val, weights, arch, batch_train, batch_val).d_arch


def with_aux(loss: Loss, has_aux: bool) -> Callable[..., tuple[Any, Any]]:
    """``loss`` as a function returning ``(value, aux)`` (``aux`` is ``None`` without aux)."""
    if not callable(loss):
        raise TypeError(f"loss functions must be callable, got {type(loss).__name__}")
    if has_aux:
        return loss

    def wrapped(w, a, batch):
        return loss(w, a, batch), None

    return wrapped


# ----------------------------------------------------------------------------- tree helpers
def tree_axpy(alpha: Any, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leafwise, keeping ``y``'s dtypes."""
    return jax.tree.map(lambda xi, yi: (yi + alpha * xi).astype(yi.dtype), x, y)


def tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
    leaves = [jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))]
    return sum(leaves[1:], leaves[0]) if leaves else jnp.zeros(())


def tree_norm(x: PyTree) -> jax.Array:
    return jnp.sqrt(tree_vdot(x, x))


# ----------------------------------------------------------------------------- derivatives
def grad_w(loss: Callable, weights: PyTree, arch: PyTree, batch: Any):
    """``(value, aux), d loss / d w`` of a ``(value, aux)`` loss."""
    (value, aux), g = jax.value_and_grad(loss, argnums=0, has_aux=True)(weights, arch, batch)
    return value, aux, g


def grad_wa(loss: Callable, weights: PyTree, arch: PyTree, batch: Any):
    """``value, aux, (d loss / d w, d loss / d arch)``: one backward pass for both."""
    (value, aux), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(weights, arch, batch)
    return value, aux, g


class Linearization(NamedTuple):
    """The training gradient at ``(w, arch)`` and its derivative along weight directions.

    ``tangent(v) -> (H_ww v, H_aw v)`` where ``H_ww = d^2 L / dw^2`` and
    ``H_aw v = d/d arch <d L/d w, v>`` (the mixed product of DARTS' second-order term).
    """

    value: Any
    aux: Any
    grad_w: PyTree
    grad_a: PyTree
    tangent: Callable[[PyTree], tuple[PyTree, PyTree]]


def linearize_grad(loss: Callable, weights: PyTree, arch: PyTree, batch: Any) -> Linearization:
    """Forward-over-reverse linearization of ``w -> (dL/dw, dL/da)`` at ``weights``.

    Equivalent to ``jax.jvp(jax.grad(loss, (0, 1)), ...)`` but the primal pass is done once and
    reused for every tangent (several solver iterations cost one tangent pass each).
    """

    def g(w):
        (value, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, arch, batch)
        return grads, (value, aux)

    (gw, ga), tangent, (value, aux) = jax.linearize(g, weights, has_aux=True)
    return Linearization(value, aux, gw, ga, tangent)


def grad_and_tangent(loss: Callable, weights: PyTree, arch: PyTree, batch: Any, v: PyTree):
    """``value, aux, dL/dw, (H_ww v, H_aw v)`` by ``jax.jvp`` of the gradient w.r.t. ``(w, arch)``.

    The primal pass is recomputed at every call (nothing kept between calls, unlike
    :func:`linearize_grad`, whose residuals would have to cross program boundaries: 10.4 GiB at
    the full DARTS size); its outputs, the loss and the training gradient, come back too.
    """

    def g(w):
        (value, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, arch, batch)
        return grads, (value, aux)

    (g_w, _), tangent, (value, aux) = jax.jvp(g, (weights,), (v,), has_aux=True)
    return value, aux, g_w, tangent


def mixed_hvp(loss: Callable, weights: PyTree, arch: PyTree, batch: Any, v: PyTree) -> PyTree:
    """``H_aw v = d/d arch <d loss/d w, v>`` exactly, by ``jax.jvp`` of ``jax.grad`` w.r.t. arch."""

    def ga(w):
        return jax.grad(lambda w_, a_: loss(w_, a_, batch)[0], argnums=1)(w, arch)

    return jax.jvp(ga, (weights,), (v,))[1]
