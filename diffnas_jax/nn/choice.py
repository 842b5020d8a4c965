"""Choice modules: put a searchable decision inside any Flax model.

NNI (LayerChoice / InputChoice / ValueChoice) and PyGlove give PyTorch/TF users this; these are
the Flax equivalents, shaped for the pure-function design of the library:

- the architecture logits of a choice live in their own variable collection ``"arch"`` (never in
  ``"params"``), so weights and architecture are separate pytrees as everywhere else;
- the mixing weights are *supplied* at apply time in the collection ``"mix"`` (same structure as
  ``"arch"``) by whatever relaxation the search uses (softmax, Gumbel one-hot, Dirichlet, ...);
  when no ``"mix"`` is given a choice falls back to ``softmax(alpha)`` so the module also runs on
  its own as a plain DARTS-style supernet;
- how a choice executes (all candidates mixed, a single sampled path, or a fixed discrete
  candidate) is set by :func:`choice_mode`, a context that the search space enters around
  ``init``/``apply``. It is read at trace time only, so it costs nothing at run time.

References: Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019 (mixed ops);
Dong & Yang, "Searching for A Robust Neural Architecture in Four GPU Hours" (GDAS), CVPR 2019
(single sampled path); Cai et al., "ProxylessNAS", ICLR 2019 (binarised paths, memory-light);
Stamoulis et al., "Single-Path NAS", 2019 and Wan et al., "FBNetV2", CVPR 2020 (width masks).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MIXED, HARD, FIXED, COLLECT = "mixed", "hard", "fixed", "collect"


@dataclasses.dataclass(frozen=True)
class ChoiceInfo:
    """Static description of one choice, as discovered by tracing the model."""

    path: str
    kind: str  # "op" | "input" | "width"
    names: tuple[str, ...]
    n_chosen: int = 1


@dataclasses.dataclass
class _Context:
    mode: str = MIXED
    genotype: Mapping[str, Any] | None = None
    registry: dict[str, ChoiceInfo] | None = None


_CONTEXT: contextvars.ContextVar[_Context] = contextvars.ContextVar("diffnas_choice_mode", default=_Context())


@contextlib.contextmanager
def choice_mode(mode: str, genotype: Mapping[str, Any] | None = None,
                registry: dict[str, ChoiceInfo] | None = None) -> Iterator[None]:
    """Trace the choices inside this block in ``mode``.

    Args:
      mode: ``"mixed"`` (all candidates weighted by the mix, DARTS), ``"hard"`` (the mix is
        one-hot and only the selected candidate runs, via ``lax.switch``: GDAS / ProxylessNAS;
        under ``vmap`` over the index XLA turns the switch into a select and all branches run),
        ``"fixed"`` (the discrete model of ``genotype``: only chosen candidates exist), or
        ``"collect"`` (mixed, and every choice records its :class:`ChoiceInfo` in ``registry``).
      genotype: ``{choice path: chosen}`` for ``"fixed"``.
      registry: dict filled in ``"collect"`` mode.
    """
    if mode not in (MIXED, HARD, FIXED, COLLECT):
        raise ValueError(f"unknown `mode` {mode!r}; expected one of {(MIXED, HARD, FIXED, COLLECT)}")
    if mode == FIXED and genotype is None:
        raise ValueError("`genotype` is required in 'fixed' mode")
    token = _CONTEXT.set(_Context(mode, genotype, registry))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.scope.path)


def _candidate_name(c: Any, i: int) -> str:
    if isinstance(c, nn.Module):
        return f"{type(c).__name__}_{i}"
    return f"{getattr(c, '__name__', type(c).__name__)}_{i}"


class _ChoiceBase(nn.Module):
    """Shared handling of the arch logits / mix / mode for every choice kind."""

    def _names(self) -> tuple[str, ...]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _weights(self, n: int, dtype) -> jax.Array:
        alpha = None
        if self.is_initializing() or self.has_variable("arch", "alpha"):
            alpha = self.variable("arch", "alpha", lambda: 1e-3 * jax.random.normal(self.make_rng("params"), (n,)))
        if self.has_variable("mix", "alpha"):
            w = self.get_variable("mix", "alpha")
            if tuple(jnp.shape(w)) != (n,):
                raise ValueError(f"choice {_path(self)!r}: mix has shape {tuple(jnp.shape(w))}, expected ({n},)")
        elif alpha is not None:
            w = jax.nn.softmax(alpha.value)
        else:
            raise ValueError(f"choice {_path(self)!r}: apply needs mixing weights in the 'mix' collection "
                             "(or logits in 'arch')")
        return jnp.asarray(w).astype(dtype)

    def _register(self, kind: str, n_chosen: int = 1) -> _Context:
        ctx = _CONTEXT.get()
        if ctx.mode == COLLECT and ctx.registry is not None:
            ctx.registry[_path(self)] = ChoiceInfo(_path(self), kind, self._names(), n_chosen)
        return ctx

    def _fixed_value(self, ctx: _Context) -> Any:
        path = _path(self)
        if path not in ctx.genotype:
            raise ValueError(f"genotype has no entry for choice {path!r}")
        return ctx.genotype[path]


def _check_same_shapes(path: str, names: Sequence[str], outs: Sequence[jax.Array]) -> None:
    ref = (outs[0].shape, outs[0].dtype)
    for name, o in zip(names[1:], outs[1:]):
        if (o.shape, o.dtype) != ref:
            raise ValueError(
                f"choice {path!r}: candidate {name!r} returns {o.shape} {o.dtype}, but {names[0]!r} "
                f"returns {ref[0]} {ref[1]}; all candidates must return the same shape and dtype")


class Choice(_ChoiceBase):
    """A mixed op over candidate Flax modules or parameter-free callables.

    ``out = sum_i mix_i * candidate_i(x)`` (mixed mode); in hard mode only the candidate at
    ``argmax(mix)`` runs and the output is ``mix[k] * candidate_k(x) + sum_{j != k} mix_j`` (the
    GDAS form: the value equals the chosen candidate for a one-hot mix and every mix entry gets a
    straight-through gradient); in fixed mode only the chosen candidate exists.

    Attributes:
      candidates: Flax modules (their parameters live under ``candidates_<i>``) or callables.
      names: readable candidate names used in genotypes (default: class / function name + index).

    Call: ``x`` of any shape ``(..., d)`` accepted by every candidate; every candidate must return
    the same shape and dtype.
    """

    candidates: Sequence[Any]
    names: Optional[Sequence[str]] = None

    def _names(self) -> tuple[str, ...]:
        if self.names is not None:
            if len(self.names) != len(self.candidates):
                raise ValueError(f"choice {_path(self)!r}: {len(self.names)} names for {len(self.candidates)} candidates")
            return tuple(self.names)
        return tuple(_candidate_name(c, i) for i, c in enumerate(self.candidates))

    @nn.compact
    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        if len(self.candidates) == 0:
            raise ValueError(f"choice {_path(self)!r} has no candidates")
        names = self._names()
        ctx = self._register("op")
        if ctx.mode == FIXED:
            chosen = self._fixed_value(ctx)
            if chosen not in names:
                raise ValueError(f"choice {_path(self)!r}: genotype names unknown candidate {chosen!r}; "
                                 f"candidates are {names}")
            return self.candidates[names.index(chosen)](x, *args, **kwargs)

        w = self._weights(len(self.candidates), x.dtype)
        if ctx.mode == HARD and not self.is_initializing():
            k = jnp.argmax(w)
            branches = [
                (lambda mdl, x_, i=i: mdl.candidates[i](x_, *args, **kwargs)) for i in range(len(self.candidates))
            ]
            out = nn.switch(k, branches, self, x)
            # Straight-through: other entries of a one-hot mix contribute their (zero) value, so
            # their gradient is the sum of the cotangent as in the GDAS reference code.
            rest = jnp.sum(w) - w[k]
            return w[k] * out + rest.astype(out.dtype)
        outs = [c(x, *args, **kwargs) for c in self.candidates]
        _check_same_shapes(_path(self), names, outs)
        return sum(w[i] * o for i, o in enumerate(outs))


class InputChoice(_ChoiceBase):
    """Choose ``n_chosen`` of ``n_inputs`` incoming tensors (DARTS edges, skip connections).

    Relaxed: ``n_chosen * sum_i mix_i * inputs[i]`` (so a one-hot mix of one chosen input has the
    discrete model's scale); fixed: the sum of the chosen inputs. The genotype entry is the tuple
    of chosen input names (the ``n_chosen`` largest logits).

    Call: a sequence of ``n_inputs`` arrays of equal shape and dtype.
    """

    n_inputs: int
    n_chosen: int = 1
    names: Optional[Sequence[str]] = None

    def _names(self) -> tuple[str, ...]:
        if self.names is not None:
            return tuple(self.names)
        return tuple(f"input_{i}" for i in range(self.n_inputs))

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
        if not 1 <= self.n_chosen <= self.n_inputs:
            raise ValueError(f"input choice {_path(self)!r}: `n_chosen`={self.n_chosen} must be in [1, {self.n_inputs}]")
        if len(inputs) != self.n_inputs:
            raise ValueError(f"input choice {_path(self)!r} expects {self.n_inputs} inputs, got {len(inputs)}")
        names = self._names()
        _check_same_shapes(_path(self), names, list(inputs))
        ctx = self._register("input", self.n_chosen)
        if ctx.mode == FIXED:
            chosen = self._fixed_value(ctx)
            chosen = (chosen,) if isinstance(chosen, str) else tuple(chosen)
            unknown = [c for c in chosen if c not in names]
            if unknown or len(chosen) != self.n_chosen:
                raise ValueError(f"input choice {_path(self)!r}: genotype entry {chosen!r} must name {self.n_chosen} "
                                 f"of {names}")
            return sum(inputs[names.index(c)] for c in chosen)
        w = self._weights(self.n_inputs, inputs[0].dtype)
        return self.n_chosen * sum(w[i] * t for i, t in enumerate(inputs))


class WidthChoice(_ChoiceBase):
    """Width (channel) search with masks over the widest tensor: static shapes throughout.

    With ``layer`` (a factory ``width -> Flax module``, e.g. ``lambda w: nn.Dense(w)``), the
    supernet builds ``layer(max(widths))`` and multiplies its output by the relaxed mask
    ``m[c] = sum_i mix_i * [c < widths[i]]``; the fixed model builds ``layer(chosen)`` only, so its
    parameter count is the chosen width's. Without ``layer`` it masks its input's last axis (fixed
    mode slices it). FBNetV2 / Single-Path NAS style channel masking.
    """

    widths: Sequence[int]
    layer: Optional[Callable[[int], Any]] = None

    def _names(self) -> tuple[str, ...]:
        return tuple(str(int(w)) for w in self.widths)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        widths = tuple(int(w) for w in self.widths)
        if not widths or min(widths) <= 0:
            raise ValueError(f"width choice {_path(self)!r}: `widths` must be positive ints, got {self.widths}")
        ctx = self._register("width")
        if ctx.mode == FIXED:
            chosen = int(self._fixed_value(ctx))
            if chosen not in widths:
                raise ValueError(f"width choice {_path(self)!r}: genotype width {chosen} not in {widths}")
            return self.layer(chosen)(x) if self.layer is not None else x[..., :chosen]
        y = self.layer(max(widths))(x) if self.layer is not None else x
        if y.shape[-1] < max(widths):
            raise ValueError(f"width choice {_path(self)!r}: tensor has {y.shape[-1]} channels, fewer than "
                             f"the widest candidate {max(widths)}")
        w = self._weights(len(widths), y.dtype)
        channel = jnp.arange(y.shape[-1])
        masks = jnp.stack([(channel < wd).astype(y.dtype) for wd in widths])  # (n, C)
        return y * (w @ masks)
