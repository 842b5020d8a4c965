"""Zero-cost proxies: score an untrained architecture from one minibatch.

Every proxy takes ``apply_fn(weights, x) -> logits`` (close over BatchNorm state and the train
flag yourself; any discrete network of any space works: ``nb201.eval_network``, a DARTS
``eval_network``, a user space's ``fix``), the weights pytree and a batch ``(x, y)``; higher is
better for all of them. References:

- grad_norm, snip, grasp, fisher, synflow as compared in Abdelfattah et al., "Zero-Cost Proxies
  for Lightweight NAS", ICLR 2021; snip: Lee et al., ICLR 2019; grasp: Wang et al., ICLR 2020;
  synflow: Tanaka et al., NeurIPS 2020; fisher: Turner et al., "BlockSwap", ICLR 2020.
- jacob_cov: Mellor et al., "Neural Architecture Search without Training" (arXiv v1, 2020).
- naswot: Mellor et al., ICML 2021 (log-determinant of the ReLU-code kernel).

``fisher`` and ``naswot`` need the network's ReLU activations. They are found generically by
interpreting the jaxpr of ``apply_fn``: every ``relu`` (``jax.nn.relu`` / ``flax.linen.relu``) or
``max(x, 0)`` outside loop primitives counts as a ReLU unit.
"""
from __future__ import annotations

from contextlib import nullcontext as _nullcontext
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax._checks import check_choice

try:  # jax >= 0.4.30 moved the core types
    from jax.extend.core import Literal
except ImportError:  # pragma: no cover
    from jax.core import Literal

ApplyFn = Callable[[Any, jax.Array], jax.Array]
_CALL_PARAMS = ("jaxpr", "call_jaxpr")


def _is_relu(eqn) -> bool:
    name = eqn.primitive.name
    if name == "custom_jvp_call" and str(eqn.params.get("name", "")) == "relu":
        return True
    if name == "max" and len(eqn.invars) == 2:
        return any(isinstance(v, Literal) and np.all(np.asarray(v.val) == 0) for v in eqn.invars)
    return False


def _eval_jaxpr(jaxpr, consts, args, hook):
    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if _is_relu(eqn):
            x = invals[0] if eqn.primitive.name == "custom_jvp_call" else next(
                a for v, a in zip(eqn.invars, invals) if not isinstance(v, Literal))
            outs = [hook(jnp.maximum(x, jnp.zeros((), x.dtype)))]
        else:
            sub = next((eqn.params[p] for p in _CALL_PARAMS if p in eqn.params), None)
            if sub is not None and eqn.primitive.name in ("pjit", "jit", "closed_call", "core_call",
                                                           "custom_jvp_call", "custom_vjp_call",
                                                           "custom_vjp_call_jaxpr", "checkpoint", "remat"):
                inner, inner_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
                n_in = len(inner.invars)
                outs = _eval_jaxpr(inner, inner_consts, invals[-n_in:] if n_in else [], hook)
            else:
                bound = eqn.primitive.get_bind_params(eqn.params)
                # older jax returns (subfuns, params), newer jax the params alone
                subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
                with eqn.ctx.manager if hasattr(eqn, "ctx") else _nullcontext():
                    ans = eqn.primitive.bind(*subfuns, *invals, **params)
                outs = ans if eqn.primitive.multiple_results else [ans]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def relu_activations(apply_fn: ApplyFn, weights: Any, x: jax.Array,
                     perturbations: Sequence[jax.Array] | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """Run ``apply_fn(weights, x)`` and return ``(logits, [relu outputs in order])``.

    With ``perturbations`` (one array per ReLU output, as returned by a first call), each is added
    to its ReLU output: the gradient with respect to it is dL/d(activation).
    """
    closed = jax.make_jaxpr(apply_fn)(weights, x)
    acts: list[jax.Array] = []

    def hook(a):
        if perturbations is not None:
            a = a + perturbations[len(acts)]
        acts.append(a)
        return a

    flat = jax.tree_util.tree_leaves((weights, x))
    (out,) = _eval_jaxpr(closed.jaxpr, closed.consts, flat, hook)[:1]
    return out, acts


def _xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))


def _loss_grad(apply_fn, weights, batch):
    x, y = batch
    return jax.grad(lambda w: _xent(apply_fn(w, x), y))(weights)


def _tree_sum(tree) -> jax.Array:
    return sum(jnp.sum(l) for l in jax.tree_util.tree_leaves(tree))


def grad_norm(apply_fn: ApplyFn, weights: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Euclidean norm of the loss gradient over all weights."""
    g = _loss_grad(apply_fn, weights, batch)
    return jnp.sqrt(_tree_sum(jax.tree_util.tree_map(jnp.square, g)))


def snip(apply_fn: ApplyFn, weights: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """SNIP saliency ``sum |w * dL/dw|`` (Lee et al. 2019)."""
    g = _loss_grad(apply_fn, weights, batch)
    return _tree_sum(jax.tree_util.tree_map(lambda w, d: jnp.abs(w * d), weights, g))


def grasp(apply_fn: ApplyFn, weights: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """GraSP ``-sum w * (H g)`` with an exact Hessian-vector product (Wang et al. 2020).

    (The GraSP paper prunes the weights with the largest ``-w * Hg``; as an architecture score
    the sum is negated so that, like every proxy here, higher is better.)
    """
    x, y = batch
    loss = lambda w: _xent(apply_fn(w, x), y)
    g = jax.grad(loss)(weights)
    hg = jax.jvp(jax.grad(loss), (weights,), (jax.lax.stop_gradient(g),))[1]
    return _tree_sum(jax.tree_util.tree_map(lambda w, h: w * h, weights, hg))


def synflow(apply_fn: ApplyFn, weights: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """SynFlow ``sum |w| * dR/d|w|`` with ``R = sum(f_{|w|}(1))`` (Tanaka et al. 2020), data-free.

    Computed in float64 when x64 is enabled (the product of all layers' magnitudes overflows
    float32 in deep networks); pass an ``apply_fn`` with BatchNorm in inference mode.
    """
    x, _ = batch
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    absw = jax.tree_util.tree_map(lambda w: jnp.abs(w).astype(dtype), weights)
    ones = jnp.ones((1,) + x.shape[1:], dtype)
    g = jax.grad(lambda w: jnp.sum(apply_fn(w, ones)))(absw)
    return _tree_sum(jax.tree_util.tree_map(lambda w, d: w * d, absw, g))


def fisher(apply_fn: ApplyFn, weights: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Fisher pruning saliency summed over ReLU channels (Turner et al. 2020):
    ``sum_channels 0.5 * mean_n (sum_spatial a * dL/da)^2``."""
    x, y = batch
    _, acts = relu_activations(apply_fn, weights, x)
    zeros = [jnp.zeros_like(a) for a in acts]

    def loss(eps):
        out, _ = relu_activations(apply_fn, weights, x, eps)
        return _xent(out, y) * x.shape[0]  # per-example gradients summed as in the reference

    grads = jax.grad(loss)(zeros)
    total = 0.0
    for a, g in zip(acts, grads):
        spatial = tuple(range(1, a.ndim - 1))
        per_channel = jnp.sum(a * g, axis=spatial) if spatial else a * g
        total = total + 0.5 * jnp.sum(jnp.mean(per_channel ** 2, axis=0))
    return jnp.asarray(total)


def jacob_cov(apply_fn: ApplyFn, weights: Any, batch: tuple[jax.Array, jax.Array], k: float = 1e-5) -> jax.Array:
    """Score of the correlation of input Jacobians across a batch (Mellor et al. 2020, v1):
    ``-sum(log(lambda + k) + 1 / (lambda + k))`` over the eigenvalues of the correlation matrix."""
    x, _ = batch
    jac = jax.grad(lambda xx: jnp.sum(apply_fn(weights, xx)))(x).reshape(x.shape[0], -1)
    jac = jac - jac.mean(axis=1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(jac ** 2, axis=1, keepdims=True))
    jac = jac / jnp.maximum(norm, jnp.finfo(jac.dtype).tiny)
    corr = jac @ jac.T
    eig = jnp.linalg.eigvalsh(corr)
    return -jnp.sum(jnp.log(jnp.abs(eig) + k) + 1.0 / (jnp.abs(eig) + k))


def naswot(apply_fn: ApplyFn, weights: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """NASWOT ``log|K_H|``, ``K_H[i, j]`` = number of ReLU units on which examples i and j agree
    (Mellor et al. 2021). ``-inf`` when two examples share their ReLU code (singular kernel)."""
    x, _ = batch
    _, acts = relu_activations(apply_fn, weights, x)
    if not acts:
        raise ValueError("`apply_fn` has no ReLU units: NASWOT is undefined")
    codes = jnp.concatenate([(a > 0).reshape(x.shape[0], -1) for a in acts], axis=1).astype(jnp.float32)
    kernel = codes @ codes.T + (1.0 - codes) @ (1.0 - codes).T
    return jnp.linalg.slogdet(kernel.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32))[1]


PROXIES = {
    "grad_norm": grad_norm, "snip": snip, "grasp": grasp, "synflow": synflow,
    "fisher": fisher, "jacob_cov": jacob_cov, "naswot": naswot,
}


def get_proxy(name: str) -> Callable[..., jax.Array]:
    """A proxy by name: grad_norm, snip, grasp, synflow, fisher, jacob_cov, naswot."""
    check_choice("proxy", name, tuple(PROXIES))
    return PROXIES[name]


def score_all(apply_fn: ApplyFn, weights: Any, batch: tuple[jax.Array, jax.Array],
              names: Sequence[str] = tuple(PROXIES)) -> dict[str, float]:
    """Every proxy in ``names`` as Python floats."""
    return {n: float(get_proxy(n)(apply_fn, weights, batch)) for n in names}


def score_population(name: str, apply_fn: Callable[[Any, jax.Array, Any], jax.Array], weights: Any,
                     batch: tuple[jax.Array, jax.Array], archs: Any, *, weights_axis: int | None = None) -> jax.Array:
    """One proxy for many architectures in one ``jax.vmap`` (one compilation for all of them).

    Architectures must share weight shapes, as the candidates of a supernet do: ``apply_fn(weights,
    x, arch)`` runs the network selected by ``arch`` (e.g. a space's ``apply`` with a one-hot mix,
    which computes the discrete network's function), and ``archs`` stacks the architectures on a
    leading axis. Abdelfattah et al., "Zero-Cost Proxies for Lightweight NAS", ICLR 2021.

    Args:
      name: a proxy of :data:`PROXIES`.
      apply_fn: ``(weights, x, arch) -> logits``.
      weights: one weights pytree shared by all architectures, or (``weights_axis=0``) one per
        architecture stacked on a leading axis (e.g. independent initialisations).
      batch: ``(x, y)``.
      archs: pytree whose leaves have a leading axis ``P`` (the population).
    Returns:
      ``(P,)`` scores, equal to calling the proxy on each architecture in turn.
    """
    proxy = get_proxy(name)
    if weights_axis not in (None, 0):
        raise ValueError(f"`weights_axis` must be None or 0, got {weights_axis!r}")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(archs)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("`archs` must stack the architectures on a leading axis shared by every leaf")

    def one(w, arch, data):
        return proxy(lambda w_, x: apply_fn(w_, x, arch), w, data)

    # jitted, so the population is one compiled program (an eager vmap dispatched every op)
    return jax.jit(jax.vmap(one, in_axes=(weights_axis, 0, None)))(weights, archs, batch)
