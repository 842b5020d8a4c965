"""Mixing: architecture logits -> mixing weights, one :class:`Relaxation` per method (axis 2 of
shared/DESIGN.md). Not to be confused with :mod:`diffnas_jax.relax`, the array-level relaxed
discrete operators (Gumbel-softmax, soft sort, ...) these are built from. Formerly
``diffnas_jax.relaxations`` (a deprecated alias for one release).

Every constructor returns a :class:`Relaxation`, called as ``relax(arch, key, step) -> mix``:
each leaf of ``arch`` is a categorical over its last axis and is mapped to mixing weights of the
same shape and dtype; the subtree under the key ``"beta"`` (PC-DARTS edge-normalisation logits,
``spaces.base.ARCH_PASSTHROUGH_KEY``) is copied unchanged, the space normalises it. ``step`` may
be traced (schedules are ``jnp`` functions of it) and ``key`` is split per leaf.

``relax.temperature(step)`` is the current temperature (``None`` for relaxations without one);
the search step logs it. Because a relaxation is only a function of the logits, every member
works with every space, hypergradient estimator and selector.

Members and papers:

=====================  =========================================================================
``softmax``            DARTS (Liu et al., ICLR 2019), with an optional temperature
``small_temperature``  sparse-noisy softmax with an exponentially decreasing temperature (Zhang &
                       Ding, "Small Temperature is All You Need for Differentiable Architecture
                       Search", PAKDD 2023)
``sparsemax``          sparsemax of the logits (Martins & Astudillo, ICML 2016)
``gdas``               Gumbel hard straight-through, temperature linear tau_max -> tau_min (Dong &
                       Yang, CVPR 2019); pair with a space's hard/single-path mode
``snas``               soft Gumbel, temperature tau0 * decay^epoch (Xie et al., ICLR 2019)
``fbnet``              soft Gumbel, tau0 * decay^epoch (Wu et al., CVPR 2019)
``drnas``              reparameterised Dirichlet sample, concentration elu(a)+1 or softplus(a)
                       (Chen et al., ICLR 2021)
``fairdarts``          independent sigmoids (Chu et al., ECCV 2020); pair with
                       ``diffnas_jax.regularizers.zero_one_loss``
``maxw``               sharpDARTS Max-W reweighting (Hundt et al., 2019)
``proxyless``          binarised paths, one or two sampled, with ProxylessNAS's gradient estimator
                       for the logits (Cai et al., ICLR 2019)
=====================  =========================================================================
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffnas_jax._checks import check_choice, check_int_in_range, check_nonnegative, check_positive
from diffnas_jax.relax.gumbel import gumbel_softmax
from diffnas_jax.relax.sparse import sparsemax as _sparsemax
from diffnas_jax.spaces.base import map_choices

PyTree = Any
LeafFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (logits, key, step) -> weights


@dataclasses.dataclass(frozen=True)
class Relaxation:
    """``relax(arch, key, step) -> mix`` plus its temperature schedule.

    Attributes:
      name: the constructor's name.
      leaf_fn: ``(logits (..., n), key, step) -> weights (..., n)`` for one categorical leaf.
      temperature_fn: ``step -> temperature`` or ``None``.
      options: the constructor's options (for printing and result files).
    """

    name: str
    leaf_fn: LeafFn
    temperature_fn: Callable[[Any], jax.Array] | None = None
    options: tuple = ()

    def __call__(self, arch: PyTree, key: jax.Array | None = None, step: Any = 0) -> PyTree:
        if key is None:
            key = jax.random.PRNGKey(0)
        step = jnp.asarray(step)
        return map_choices(lambda logits, k: self._leaf(logits, k, step), arch, key)

    def _leaf(self, logits: jax.Array, key: jax.Array, step: jax.Array) -> jax.Array:
        logits = jnp.asarray(logits)
        if logits.ndim < 1:
            raise ValueError(f"relaxation {self.name!r}: every arch leaf needs a last (choice) axis, got a scalar")
        dtype = logits.dtype if jnp.issubdtype(logits.dtype, jnp.floating) else jnp.result_type(float)
        return self.leaf_fn(logits.astype(dtype), key, step).astype(dtype)

    def temperature(self, step: Any) -> jax.Array | None:
        """The temperature at ``step`` (``None`` if this relaxation has none)."""
        return None if self.temperature_fn is None else self.temperature_fn(jnp.asarray(step))


def _steps(step, dtype=jnp.float32):
    return jnp.asarray(step).astype(dtype)


def softmax(temperature: float = 1.0) -> Relaxation:
    """DARTS: ``softmax(logits / temperature)`` over each edge's ops."""
    check_positive("temperature", temperature)
    return Relaxation("softmax", lambda a, k, s: jax.nn.softmax(a / temperature, axis=-1),
                      lambda s: jnp.asarray(temperature, jnp.float32), (("temperature", temperature),))


def small_temperature(total_steps: int, t0: float = 1.0, t_min: float = 0.01, noise: float = 1.0) -> Relaxation:
    """Sparse-noisy softmax ``softmax((logits + noise * N(0, 1)) / T(step))`` with the exponential
    schedule ``T(step) = t0 * (t_min / t0) ** (step / total_steps)`` (Zhang & Ding 2023): a small
    final temperature makes the supernet's mix nearly one-hot, closing the gap to the discrete
    network; the noise keeps exploring while the temperature is high."""
    check_int_in_range("total_steps", total_steps, 1, 10**12)
    check_positive("t0", t0)
    check_positive("t_min", t_min)
    check_nonnegative("noise", noise)

    def temp(s):
        frac = jnp.clip(_steps(s) / total_steps, 0.0, 1.0)
        return t0 * (t_min / t0) ** frac

    def leaf(a, k, s):
        z = a + noise * jax.random.normal(k, a.shape, a.dtype)
        return jax.nn.softmax(z / temp(s).astype(a.dtype), axis=-1)

    return Relaxation("small_temperature", leaf, temp,
                      (("total_steps", total_steps), ("t0", t0), ("t_min", t_min), ("noise", noise)))


def sparsemax() -> Relaxation:
    """Sparsemax of each edge's logits: exact zeros for weak ops (Martins & Astudillo 2016)."""
    return Relaxation("sparsemax", lambda a, k, s: _sparsemax(a, axis=-1))


def gdas(total_steps: int, tau_max: float = 10.0, tau_min: float = 0.1) -> Relaxation:
    """GDAS: a one-hot Gumbel sample per edge with the straight-through gradient of the soft sample;
    ``tau`` decreases linearly from ``tau_max`` to ``tau_min`` over ``total_steps`` (Dong & Yang 2019).
    Use a space's hard / single-path mode so only the sampled op is computed."""
    check_int_in_range("total_steps", total_steps, 1, 10**12)
    check_positive("tau_max", tau_max)
    check_positive("tau_min", tau_min)

    def temp(s):
        frac = jnp.clip(_steps(s) / total_steps, 0.0, 1.0)
        return tau_max - (tau_max - tau_min) * frac

    def leaf(a, k, s):
        return gumbel_softmax(k, a, temperature=temp(s).astype(a.dtype), hard=True)

    return Relaxation("gdas", leaf, temp, (("total_steps", total_steps), ("tau_max", tau_max), ("tau_min", tau_min)))


def _annealed_gumbel(name: str, tau0: float, decay: float, steps_per_epoch: int, tau_min: float) -> Relaxation:
    check_positive("tau0", tau0)
    check_positive("decay", decay)
    check_int_in_range("steps_per_epoch", steps_per_epoch, 1, 10**12)
    check_positive("tau_min", tau_min)

    def temp(s):
        return jnp.maximum(tau0 * decay ** (_steps(s) / steps_per_epoch), tau_min)

    def leaf(a, k, s):
        return gumbel_softmax(k, a, temperature=temp(s).astype(a.dtype), hard=False)

    return Relaxation(name, leaf, temp, (("tau0", tau0), ("decay", decay), ("steps_per_epoch", steps_per_epoch)))


def snas(tau0: float = 1.0, decay: float = 0.97, steps_per_epoch: int = 1, tau_min: float = 1e-3) -> Relaxation:
    """SNAS: soft Gumbel-softmax sample, ``tau = tau0 * decay ** (step / steps_per_epoch)``
    (Xie et al. 2019: tau0 1.0, decay 0.97 per epoch)."""
    return _annealed_gumbel("snas", tau0, decay, steps_per_epoch, tau_min)


def fbnet(tau0: float = 5.0, decay: float = 0.956, steps_per_epoch: int = 1, tau_min: float = 1e-3) -> Relaxation:
    """FBNet: soft Gumbel-softmax sample, ``tau = tau0 * decay ** epoch`` (Wu et al. 2019: tau0 5.0,
    decay exp(-0.045) = 0.956 per epoch)."""
    return _annealed_gumbel("fbnet", tau0, decay, steps_per_epoch, tau_min)


def drnas(concentration: str = "elu", scale: float = 1.0) -> Relaxation:
    """DrNAS: a reparameterised Dirichlet sample per edge with concentration ``elu(a) + 1``
    (or ``softplus(a)``), times ``scale`` (Chen et al. 2021). Gradients flow through
    ``jax.random.dirichlet``'s implicit reparameterisation of the Gamma draws."""
    check_choice("concentration", concentration, ("elu", "softplus"))
    check_positive("scale", scale)

    def leaf(a, k, s):
        conc = (jax.nn.elu(a) + 1.0) if concentration == "elu" else jax.nn.softplus(a)
        conc = jnp.maximum(scale * conc, jnp.finfo(a.dtype).tiny)
        sample = jax.random.dirichlet(k, conc.astype(jnp.float32) if a.dtype == jnp.bfloat16 else conc)
        return sample.astype(a.dtype)

    return Relaxation("drnas", leaf, None, (("concentration", concentration), ("scale", scale)))


def fairdarts() -> Relaxation:
    """FairDARTS: independent sigmoids (ops do not compete through a softmax; Chu et al. 2020)."""
    return Relaxation("fairdarts", lambda a, k, s: jax.nn.sigmoid(a))


def maxw(temperature: float = 1.0) -> Relaxation:
    """sharpDARTS Max-W reweighting: ``w = p + (1 - max(p))`` with ``p = softmax(a / T)``, so the
    strongest op always has weight 1 and the others are lifted by the same margin; weak ops keep
    receiving gradient while the strongest is not favoured by its magnitude alone (our reading of
    Hundt, Jain & Hager 2019, Sec. 3)."""
    check_positive("temperature", temperature)

    def leaf(a, k, s):
        p = jax.nn.softmax(a / temperature, axis=-1)
        return p + (1.0 - jnp.max(p, axis=-1, keepdims=True))

    return Relaxation("maxw", leaf, lambda s: jnp.asarray(temperature, jnp.float32), (("temperature", temperature),))


@jax.custom_vjp
def _gate(logits: jax.Array, active: jax.Array, gate: jax.Array) -> jax.Array:
    return gate


def _gate_fwd(logits, active, gate):
    return gate, (logits, active)


def _gate_bwd(res, dg):
    logits, active = res
    # dL/da_i = sum_j dL/dg_j * q_j * (delta_ij - q_i) over the active paths (Cai et al., Eq. 4),
    # q = softmax renormalised over the active paths
    q = jax.nn.softmax(jnp.where(active > 0, logits, -jnp.inf))
    return q * (dg - jnp.sum(dg * q)), jnp.zeros_like(active), jnp.zeros_like(dg)


_gate.defvjp(_gate_fwd, _gate_bwd)


def _binary_gate_1d(logits: jax.Array, key: jax.Array, num_paths: int) -> jax.Array:
    """One-hot gate of one edge, with ProxylessNAS's gradient for the logits. The sampling is
    done outside the custom VJP so that no PRNG key is closed over (traced keys inside scans)."""
    a = jax.lax.stop_gradient(logits)
    n = a.shape[-1]
    if num_paths == 1 or n < 2:
        active = jnp.ones((n,), a.dtype)
    else:
        g = a + jax.random.gumbel(jax.random.fold_in(key, 1), a.shape, a.dtype)
        pair = jax.lax.top_k(g, 2)[1]  # two paths sampled without replacement, prob. ~ softmax
        active = jnp.zeros((n,), a.dtype).at[pair].set(1.0)
    idx = jax.random.categorical(key, jnp.where(active > 0, a, -jnp.inf))
    return _gate(logits, active, jax.nn.one_hot(idx, n, dtype=a.dtype))


def proxyless(num_paths: int = 2) -> Relaxation:
    """ProxylessNAS binarised paths: a one-hot gate per edge sampled from ``softmax(a)`` (with
    ``num_paths=2``: first two paths are sampled without replacement and the gate picks one of them
    with renormalised probabilities); the logits get the estimator
    ``dL/da_i = sum_j dL/dg_j p_j (delta_ij - p_i)`` over the sampled paths (Cai et al. 2019)."""
    check_int_in_range("num_paths", num_paths, 1, 2)

    def leaf(a, k, s):
        flat = a.reshape(-1, a.shape[-1])
        keys = jax.random.split(k, flat.shape[0])
        out = jax.vmap(lambda row, kk: _binary_gate_1d(row, kk, num_paths))(flat, keys)
        return out.reshape(a.shape)

    return Relaxation("proxyless", leaf, None, (("num_paths", num_paths),))


RELAXATIONS = {
    "softmax": softmax, "small_temperature": small_temperature, "sparsemax": sparsemax, "gdas": gdas,
    "snas": snas, "fbnet": fbnet, "drnas": drnas, "fairdarts": fairdarts, "maxw": maxw, "proxyless": proxyless,
}


def get_relaxation(name: str, **kwargs: Any) -> Relaxation:
    """A relaxation by name with keyword options (``ValueError`` naming unknown names)."""
    check_choice("relaxation", name, tuple(RELAXATIONS))
    return RELAXATIONS[name](**kwargs)


def __getattr__(name: str) -> Any:
    if name == "fairdarts_zero_one_loss":  # one definition, with the other regularisers
        import warnings

        warnings.warn("fairdarts_zero_one_loss lives in diffnas_jax.regularizers", DeprecationWarning, stacklevel=2)
        from diffnas_jax.regularizers import fairdarts_zero_one_loss

        return fairdarts_zero_one_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
