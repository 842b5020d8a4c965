"""Turn any Flax model with :mod:`diffnas_jax.nn` choices into a search space.

``from_module(module, example_input)`` gives the same protocol as the built-in spaces
(:mod:`diffnas_jax.spaces.base`), so every relaxation, hypergradient estimator and selector of the
library runs on a user's model unchanged; ``fix(module, genotype)`` gives the discrete model with
only the chosen candidates' parameters (at the same parameter paths as in the supernet, so a
supernet's weights can be inherited).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax.nn.choice import COLLECT, FIXED, HARD, MIXED, ChoiceInfo, choice_mode
from diffnas_jax.spaces.scaffold import flax_apply
from diffnas_jax.spaces.base import SpaceDefaults, check_mix_matches, check_size_kwargs, leaf_candidates, leaf_key

_RESERVED = ("params", "arch", "mix")


def _takes_train(module: nn.Module) -> bool:
    try:
        return "train" in inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _split_path(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) if path else ()


def _set_in(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get_in(tree: Mapping, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


@dataclasses.dataclass(frozen=True)
class UserSpace(SpaceDefaults):
    """A search space over the choices of a Flax module (see :func:`from_module`).

    Protocol: ``init(key, x) -> (weights, state)``, ``init_arch(key) -> arch`` (nested dict
    mirroring the module tree, one ``alpha`` vector of logits per choice),
    ``apply(weights, state, mix, x, train, *, rng=None) -> (out, state)``,
    ``genotype(arch) -> {choice path: chosen}``, ``arch_from_genotype``, ``random_genotype``.
    """

    module: nn.Module
    choices: tuple[ChoiceInfo, ...]
    arch_shapes: Any
    hard: bool = False
    train_kwarg: bool = False
    example: jax.ShapeDtypeStruct | None = None

    # -- helpers -------------------------------------------------------------------------------
    def _kwargs(self, train: bool) -> dict:
        return {"train": train} if self.train_kwarg else {}

    @property
    def choice_paths(self) -> tuple[str, ...]:
        return tuple(c.path for c in self.choices)

    def _info(self, path: str) -> ChoiceInfo:
        for c in self.choices:
            if c.path == path:
                return c
        raise ValueError(f"unknown choice {path!r}; the space's choices are {self.choice_paths}")

    # -- protocol ------------------------------------------------------------------------------
    def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
        """Weights (``"params"``) and state (every other mutable collection, e.g. batch_stats)."""
        variables = _jitted_init(self.module, key, x, self._kwargs(False), mode=MIXED)
        weights = variables.get("params", {})
        state = {k: v for k, v in variables.items() if k not in _RESERVED}
        return weights, state

    def init_arch(self, key: jax.Array) -> dict:
        """Architecture logits, ``1e-3 * N(0, 1)`` per choice as in DARTS."""
        leaves, treedef = jax.tree_util.tree_flatten(self.arch_shapes)
        keys = jax.random.split(key, max(len(leaves), 1))
        return jax.tree_util.tree_unflatten(
            treedef, [1e-3 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])

    def apply(self, weights: Any, state: Any, mix: Any, x: jax.Array, train: bool, *,
              rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
        check_mix_matches(self.arch_shapes, mix)
        with choice_mode(HARD if self.hard else MIXED):
            return flax_apply(self.module, weights, state, x, update_state=bool(train), collections=True, extra={"mix": mix},
                              rngs={"dropout": rng} if rng is not None else {}, **self._kwargs(bool(train)))

    def genotype(self, arch: Any) -> dict[str, Any]:
        """``{choice path: chosen}``: a candidate name (``Choice``), a width (``WidthChoice``, int)
        or a tuple of input names (``InputChoice``, the ``n_chosen`` largest logits)."""
        check_mix_matches(self.arch_shapes, arch, name="arch")
        out: dict[str, Any] = {}
        for c in self.choices:
            logits = np.asarray(_get_in(arch, _split_path(c.path))["alpha"])
            if c.kind == "input":
                top = np.argsort(-logits, kind="stable")[: c.n_chosen]
                out[c.path] = tuple(c.names[i] for i in sorted(top))
            elif c.kind == "width":
                out[c.path] = int(c.names[int(np.argmax(logits))])
            else:
                out[c.path] = c.names[int(np.argmax(logits))]
        return out

    def arch_from_genotype(self, genotype: Mapping[str, Any], scale: float = 10.0) -> dict:
        """Logits that decode to ``genotype`` (``scale`` on the chosen entries, 0 elsewhere)."""
        arch = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), self.arch_shapes)
        for path in genotype:
            self._info(path)
        for c in self.choices:
            if c.path not in genotype:
                raise ValueError(f"genotype has no entry for choice {c.path!r}")
            value = genotype[c.path]
            chosen = (value,) if isinstance(value, (str, int)) else tuple(value)
            vec = np.zeros(len(c.names), np.float32)
            for v in chosen:
                if str(v) not in c.names:
                    raise ValueError(f"choice {c.path!r}: genotype names unknown candidate {v!r}; candidates are {c.names}")
                vec[c.names.index(str(v))] = scale
            _get_in(arch, _split_path(c.path))["alpha"] = vec
        return jax.tree_util.tree_map(jnp.asarray, arch)

    def random_genotype(self, key: jax.Array) -> dict[str, Any]:
        """A uniformly random discrete architecture."""
        keys = jax.random.split(key, max(len(self.choices), 1))
        out: dict[str, Any] = {}
        for k, c in zip(keys, self.choices):
            perm = np.asarray(jax.random.permutation(k, len(c.names)))
            if c.kind == "input":
                out[c.path] = tuple(c.names[i] for i in sorted(perm[: c.n_chosen]))
            elif c.kind == "width":
                out[c.path] = int(c.names[perm[0]])
            else:
                out[c.path] = c.names[perm[0]]
        return out

    def fix(self, genotype: Mapping[str, Any]) -> "FixedModel":
        return fix(self.module, genotype, _space=self)

    def codec(self):
        """:func:`diffnas_jax.baselines.codec.user_codec`: one decision per choice."""
        from diffnas_jax.baselines.codec import user_codec

        return user_codec(self)

    def candidate_names(self, leaf: str) -> tuple[str, ...]:
        """The candidate names of the choice whose ``alpha`` leaf is ``leaf`` (a keystr path)."""
        return leaf_candidates("user space candidate_names", leaf,
                               {leaf_key(*_split_path(c.path), "alpha"): c.names for c in self.choices})

    def eval_network(self, genotype: Mapping[str, Any] | str, **size: Any) -> "UserEvalNetwork":
        """The discrete model of ``genotype`` (a dict or its text form) with the protocol's
        ``apply(weights, state, mix, x, train, *, rng)`` (``mix`` ignored). A user module has no
        size arguments: any is a ``ValueError``."""
        check_size_kwargs("user space eval_network", size, ())
        if isinstance(genotype, str):
            import ast

            try:
                genotype = ast.literal_eval(genotype)
            except (ValueError, SyntaxError):
                raise ValueError(f"`genotype` {genotype!r} is not a dict {{choice path: chosen}}") from None
        return UserEvalNetwork(self.fix(genotype))

    # -- cost ----------------------------------------------------------------------------------
    def _example(self, input_shape: Any) -> jax.ShapeDtypeStruct:
        if input_shape is None:
            if self.example is None:
                raise ValueError("`input_shape` is required: the space was built without an example input")
            return jax.ShapeDtypeStruct((1,) + tuple(self.example.shape[1:]), self.example.dtype)
        dtype = self.example.dtype if self.example is not None else jnp.float32
        return jax.ShapeDtypeStruct((1,) + tuple(int(v) for v in input_shape), dtype)

    def network_cost(self, genotype: Mapping[str, Any], input_shape: Any = None, **size: Any):
        """:class:`~diffnas_jax.cost.Cost` of the discrete model of ``genotype``, counted on its
        trace: multiply-adds of its convolutions and matrix products per example
        (:func:`~diffnas_jax.cost.count_macs`) and its number of weights. ``input_shape``: one
        example's shape (default: the example input's)."""
        from diffnas_jax.cost.analytic import Cost
        from diffnas_jax.cost.counting import count_macs, count_params

        check_size_kwargs("user space network_cost", size, ())
        x = self._example(input_shape)
        net = self.fix(genotype)
        w, s = jax.eval_shape(net.init, jax.random.key(0), x)
        macs = count_macs(lambda xx, ww, ss: net.apply(ww, ss, xx, False)[0], x, w, s)
        return Cost(int(macs), count_params(w))

    def cost_table(self, input_shape: Any = None, metric: str = "flops", **size: Any):
        """:class:`~diffnas_jax.cost.CostTable` with the structure of the arch: for every choice,
        each candidate's cost change against a reference architecture (every choice at its first
        candidates), shifted so the cheapest candidate costs 0; the constant is the rest.

        Exact (``expected_cost`` of a one-hot mix equals :meth:`network_cost`) when the choices'
        costs add up, e.g. candidates that keep their input and output shapes; an approximation
        around the reference when one choice changes the shapes another choice sees
        (``WidthChoice`` before a searched layer). Costs ``1 + sum(candidates - 1)`` traces."""
        from diffnas_jax.cost.table import analytic_table, check_static_metric

        check_static_metric(metric)
        check_size_kwargs("user space cost_table", size, ())
        value = lambda g: getattr(self.network_cost(g, input_shape), metric)  # noqa: E731
        options = {c.path: self._options(c) for c in self.choices}
        ref = {c.path: options[c.path][0] for c in self.choices}
        base = value(ref)
        per = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float64), self.arch_shapes)
        constant = float(base)
        for c in self.choices:
            row = np.zeros(len(c.names), np.float64)
            for k, name in enumerate(c.names):
                chosen = self._with_candidate(c, ref[c.path], name)
                if chosen != ref[c.path]:
                    row[k] = value({**ref, c.path: chosen}) - base
            constant += float(row.min())
            _get_in(per, _split_path(c.path))["alpha"] = row - row.min()
        return analytic_table(per, constant, metric)

    @staticmethod
    def _options(c: ChoiceInfo) -> list:
        if c.kind == "input":
            return [tuple(c.names[: c.n_chosen])]
        if c.kind == "width":
            return [int(n) for n in c.names]
        return list(c.names)

    @staticmethod
    def _with_candidate(c: ChoiceInfo, ref: Any, name: str) -> Any:
        """The reference value of choice ``c`` with candidate ``name`` in it."""
        if c.kind == "width":
            return int(name)
        if c.kind != "input":
            return name
        if name in ref:
            return ref
        # swap the last reference input for ``name``: the cost of taking it instead of another
        return tuple(sorted(ref[:-1] + (name,), key=c.names.index))


@dataclasses.dataclass(frozen=True)
class UserEvalNetwork:
    """A :class:`FixedModel` behind the protocol's ``apply(weights, state, mix, x, train, *, rng)``."""

    model: "FixedModel"

    def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
        return self.model.init(key, x)

    def apply(self, weights: Any, state: Any, mix: Any, x: jax.Array, train: bool, *,
              rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """The discrete model's output; ``mix`` is ignored (pass ``None``)."""
        return self.model.apply(weights, state, x, train, rng=rng)


def _jitted_init(module: nn.Module, key: jax.Array, x: Any, kwargs: dict, **choice_context: Any) -> Any:
    """``module.init`` as one compiled program: run eagerly, every initializer of a new shape
    compiled its own small program (a user CNN spent most of its start in ~100
    ``_truncated_normal`` compiles). The choice mode is set while the function is traced."""
    def init(key, x):
        with choice_mode(**choice_context):
            return module.init({"params": key, "dropout": key}, x, **kwargs)

    return jax.jit(init)(key, x)


class _ReadTracking(dict):
    """A genotype dict that records which choice paths the traced module looked up."""

    def __init__(self, genotype: Mapping[str, Any]):
        super().__init__(genotype)
        self.read: set[str] = set()

    def __getitem__(self, path: str) -> Any:
        self.read.add(path)
        return super().__getitem__(path)


@dataclasses.dataclass(frozen=True)
class FixedModel:
    """The discrete model of a genotype: ``init(key, x) -> (weights, state)`` and
    ``apply(weights, state, x, train, *, rng=None) -> (out, state)``; only chosen candidates have
    parameters, at the same paths as in the supernet."""

    module: nn.Module
    genotype: Mapping[str, Any]
    train_kwarg: bool = False

    def _kwargs(self, train: bool) -> dict:
        return {"train": train} if self.train_kwarg else {}

    def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
        seen = _ReadTracking(self.genotype)
        variables = _jitted_init(self.module, key, x, self._kwargs(False), mode=FIXED, genotype=seen)
        unknown = sorted(set(self.genotype) - seen.read)
        if unknown:
            raise ValueError(f"genotype names choices the module does not have: {unknown}")
        return variables.get("params", {}), {k: v for k, v in variables.items() if k not in _RESERVED}

    def apply(self, weights: Any, state: Any, x: jax.Array, train: bool = False, *,
              rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
        with choice_mode(FIXED, genotype=self.genotype):
            return flax_apply(self.module, weights, state, x, update_state=bool(train), collections=True,
                              rngs={"dropout": rng} if rng is not None else {}, **self._kwargs(bool(train)))


def from_module(module: nn.Module, example_input: Any, *, hard: bool = False) -> UserSpace:
    """Make a search space of a Flax module that contains ``Choice`` / ``InputChoice`` /
    ``WidthChoice`` submodules.

    Args:
      module: a Flax linen module; if its ``__call__`` takes ``train``, the space passes it.
      example_input: an input batch (only its shape and dtype are used).
      hard: single-path execution: with a one-hot mix (GDAS, ProxylessNAS relaxations) only the
        chosen candidate of each ``Choice`` runs (``lax.switch``).

    Returns:
      A :class:`UserSpace`.

    Raises:
      ValueError: when the module has no choices, or candidates of a choice disagree in shape.
    """
    registry: dict[str, ChoiceInfo] = {}
    takes_train = _takes_train(module)
    kwargs = {"train": False} if takes_train else {}
    with choice_mode(COLLECT, registry=registry):
        shapes = jax.eval_shape(lambda k, x: module.init({"params": k, "dropout": k}, x, **kwargs),
                                jax.random.PRNGKey(0), example_input)
    if not registry:
        raise ValueError("`module` contains no Choice / InputChoice / WidthChoice: nothing to search")
    arch_shapes = shapes.get("arch", {})
    return UserSpace(module=module, choices=tuple(registry[p] for p in sorted(registry)),
                     arch_shapes=jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), arch_shapes),
                     hard=hard, train_kwarg=takes_train,
                     example=jax.ShapeDtypeStruct(jnp.shape(example_input), jnp.result_type(example_input)))


def fix(module: nn.Module, genotype: Mapping[str, Any], *, _space: UserSpace | None = None) -> FixedModel:
    """The discrete model of ``module`` for ``genotype`` (a dict ``{choice path: chosen}``).

    Unknown choice paths or candidate names raise ``ValueError`` naming the choice (checked
    against the module's choices when ``init`` traces it).
    """
    if not isinstance(genotype, Mapping):
        raise TypeError(f"`genotype` must be a dict {{choice path: chosen}}, got {type(genotype).__name__}")
    if _space is not None:
        for path in genotype:
            _space._info(path)
    return FixedModel(module=module, genotype=dict(genotype), train_kwarg=_takes_train(module))
