"""Search spaces by name: the one place the CLI, driver, evaluation, cost models, baselines and
selectors look a space up.

An entry is ``(constructor, search preset, evaluation preset)`` plus the names under which the
space takes the generic sizes ``channels`` and ``layers`` (NB201 calls its cells per stage
``N``, DARTS its cells ``layers``; MBConv takes neither). Adding a space means one
:func:`register_space` call next to its module; nothing else asks which space it holds.

Arguments are never dropped: a keyword the constructor (or the evaluation network) does not
take raises ``ValueError`` naming it (e.g. PC-DARTS' ``partial_channels`` for ``nb201``).

>>> from diffnas_jax.spaces import registry
>>> space = registry.make_space("nb201", num_classes=10, channels=4, layers=1)
>>> space.C, space.N
(4, 1)
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # the registry imports no JAX: the CLI reads it before JAX loads
    from .base import EvalNetwork, SearchSpace

__all__ = ["SpaceEntry", "register_space", "get_space", "list_spaces", "make_space", "make_eval_network",
           "name_of", "eval_preset", "latency_profiler", "spaces_with_latency_profiler"]


@dataclasses.dataclass(frozen=True)
class SpaceEntry:
    """One registered space.

    Attributes:
      name: registry key.
      constructor: ``"module:function"`` (imported on first use, so the registry stays light)
        or a callable returning a :class:`~diffnas_jax.spaces.base.SearchSpace`.
      search_preset: constructor keywords of the default supernet (sized for a ~2 minute digits
        search on a 2-core CPU).
      eval_preset: ``space.eval_network`` keywords of the default from-scratch network.
      size_names: ``{"channels": ..., "layers": ...}``: the space's own names of the generic sizes.
      space_type: ``"module:Class"`` of the space objects (for :func:`name_of`), optional.
      latency_profiler: ``"module:function"`` or a callable ``profiler(space, input_shape,
        batch_size, repeats, warmup, dtype) -> (per_choice, constant_ms, entries)`` that times the
        space's candidate ops (see :func:`diffnas_jax.cost.profile_latency`); optional: a space
        without one cannot be profiled (``diffnas profile`` offers only spaces that have one).
    """

    name: str
    constructor: str | Callable[..., SearchSpace]
    search_preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    size_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    space_type: str | None = None
    latency_profiler: str | Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., SearchSpace]:
        """The constructor (imports its module)."""
        return _import(self.constructor) if isinstance(self.constructor, str) else self.constructor

    def parameters(self) -> tuple[str, ...]:
        """The keyword names the constructor takes."""
        return tuple(inspect.signature(self.resolve()).parameters)

    def _sizes(self, channels: int | None, layers: int | None) -> dict[str, Any]:
        out = {}
        for generic, value in (("channels", channels), ("layers", layers)):
            if value is None:
                continue
            if generic not in self.size_names:
                raise ValueError(f"space {self.name!r} has no `{generic}` size (it is sized by its preset "
                                 f"{dict(self.search_preset)})")
            out[self.size_names[generic]] = value
        return out


_REGISTRY: dict[str, SpaceEntry] = {}


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def register_space(entry: SpaceEntry, *, overwrite: bool = False) -> SpaceEntry:
    """Add ``entry`` to the registry; ``ValueError`` when the name is taken (unless ``overwrite``)."""
    if not isinstance(entry, SpaceEntry):
        raise TypeError(f"`entry` must be a SpaceEntry, got {type(entry).__name__}")
    if entry.name in _REGISTRY and not overwrite:
        raise ValueError(f"a space named {entry.name!r} is already registered (pass overwrite=True)")
    _REGISTRY[entry.name] = entry
    return entry


def list_spaces() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def get_space(name: str) -> SpaceEntry:
    """The entry of ``name``; ``ValueError`` listing the registered names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown space {name!r}; registered spaces: {list_spaces()}")
    return _REGISTRY[name]


def eval_preset(name: str) -> dict[str, Any]:
    """The evaluation preset of ``name`` (a copy)."""
    return dict(get_space(name).eval_preset)


def make_space(name: str, num_classes: int | None = None, *, channels: int | None = None,
               layers: int | None = None, **kwargs: Any) -> SearchSpace:
    """The supernet ``name``: its search preset, then ``channels`` / ``layers`` (under the space's
    own names), then ``kwargs`` (e.g. a method's ``partial_channels``), then ``num_classes``.

    Raises:
      ValueError: unknown space, or an argument the constructor does not take (named).
    """
    entry = get_space(name)
    kw = {**entry.search_preset, **entry._sizes(channels, layers), **kwargs}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    from .base import check_size_kwargs

    check_size_kwargs(f"space {name!r}", kw, entry.parameters())
    return entry.resolve()(**kw)


def make_eval_network(name: str, genotype: Any, num_classes: int | None = None, *, channels: int | None = None,
                      layers: int | None = None, **size: Any) -> EvalNetwork:
    """The from-scratch network of ``genotype`` in space ``name``: the evaluation preset, then
    ``channels`` / ``layers``, then ``size``; ``space.eval_network`` rejects what it does not take."""
    entry = get_space(name)
    space = entry.resolve()(**({"num_classes": num_classes} if num_classes is not None else {}))
    kw = {**entry.eval_preset, **entry._sizes(channels, layers), **size}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    return space.eval_network(genotype, **kw)


def spaces_with_latency_profiler() -> tuple[str, ...]:
    """The registered names whose entry has a latency profiler (imports nothing)."""
    return tuple(n for n, e in _REGISTRY.items() if e.latency_profiler is not None)


def latency_profiler(space: SearchSpace) -> tuple[str, Callable[..., Any]]:
    """``(registered name, profiler)`` of ``space``'s type.

    Raises:
      ValueError: naming the space when its type is not registered or its entry has no profiler.
    """
    try:
        name = name_of(space)
    except ValueError:
        raise ValueError(f"no latency profiler for a {type(space).__name__}: it is not a registered space type; "
                         f"register one with register_space(SpaceEntry(..., space_type=..., latency_profiler=...)) "
                         f"(spaces with one: {list(spaces_with_latency_profiler())})") from None
    entry = _REGISTRY[name]
    if entry.latency_profiler is None:
        raise ValueError(f"space {name!r} has no latency profiler (spaces with one: "
                         f"{list(spaces_with_latency_profiler())}); give its SpaceEntry a `latency_profiler`")
    fn = entry.latency_profiler
    return name, (_import(fn) if isinstance(fn, str) else fn)


def name_of(space: SearchSpace) -> str:
    """The registered name of ``space``'s type (``ValueError`` for an unregistered type, e.g. a
    user-defined space)."""
    for entry in _REGISTRY.values():
        if entry.space_type is not None and isinstance(space, _import(entry.space_type)):
            return entry.name
    raise ValueError(f"a {type(space).__name__} is not a registered space type ({list_spaces()})")


# The built-in spaces. Presets: the sizes that make the default digits search take about two
# minutes on a 2-core CPU, and a from-scratch network of the same family.
register_space(SpaceEntry(
    "nb201", "diffnas_jax.spaces.nb201:search_space", {"C": 8, "N": 1}, {"C": 8, "N": 1},
    {"channels": "C", "layers": "N"}, "diffnas_jax.spaces.nb201:NB201Space", "diffnas_jax.cost.latency:nb201_profiler"))
register_space(SpaceEntry(
    "darts", "diffnas_jax.spaces.darts:search_space", {"C": 8, "layers": 3},
    {"C": 8, "layers": 3, "auxiliary": False, "drop_path_prob": 0.0}, {"channels": "C", "layers": "layers"},
    "diffnas_jax.spaces.darts:DartsSearchSpace"))
register_space(SpaceEntry(
    "pcdarts", "diffnas_jax.spaces.darts:search_space",
    {"C": 8, "layers": 3, "partial_channels": 4, "edge_normalization": True},
    {"C": 8, "layers": 3, "auxiliary": False, "drop_path_prob": 0.0}, {"channels": "C", "layers": "layers"}))
register_space(SpaceEntry(
    "mbconv", "diffnas_jax.spaces.mbconv:search_space",
    {"widths": (8, 8, 16, 16, 32, 32), "stem_width": 8, "first_width": 8, "head_width": 64},
    {"widths": (8, 8, 16, 16, 32, 32), "stem_width": 8, "first_width": 8, "head_width": 64},
    {}, "diffnas_jax.spaces.mbconv:MBConvSpace", "diffnas_jax.cost.latency:mbconv_profiler"))
