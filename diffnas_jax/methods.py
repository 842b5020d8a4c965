"""Differentiable-NAS methods by name: relaxation x hypergradient x regulariser x selector.

A method is not a supernet class (as in AutoDL-Projects or NASLib) but one point of the four
independent axes of :mod:`diffnas_jax` plus the hyperparameters its paper uses. The registry lets
a user or the driver pick a method by string::

    m = get_method("gdas")                 # the paper's defaults
    m = get_method("darts", arch_lr=1e-3)  # with an override
    relax = m.relaxation_factory()         # relax(arch, key, step) -> mix
    estimator = m.hypergrad_factory()
    tx_arch, tx_w = m.arch_optimizer(), m.weight_optimizer(total_steps)

Factories are resolved lazily (``import diffnas_jax.methods`` imports no relaxation or estimator
module), so the registry is cheap to import and overrides of factory keyword arguments are
passed at call time: ``m.relaxation_factory(tau_min=0.05)``.

Defaults follow the papers' CIFAR-10 search settings (the DARTS space); where a paper gives
no value the DARTS value is used and the entry's ``notes`` say so.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # optax (and so jax) loads on first use: the CLI validates --method without it
    import optax

__all__ = ["Factory", "Method", "get_method", "list_methods", "register_method"]


@dataclasses.dataclass(frozen=True)
class Factory:
    """A lazily resolved constructor ``module.name(**kwargs)``.

    Calling it imports ``diffnas_jax.<module>`` and calls ``<name>(**{**kwargs, **overrides})``.
    ``Factory(None, None)`` (``NONE``) stands for "no component" and calling it returns ``None``.

    Attributes:
      module: sub-module of ``diffnas_jax`` (e.g. ``"mixing"``, ``"hypergrad"``).
      name: constructor name in that module.
      kwargs: default keyword arguments (a tuple of pairs so the dataclass stays hashable).
    """

    module: str | None
    name: str | None
    kwargs: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def of(module: str, name: str, **kwargs: Any) -> "Factory":
        return Factory(module, name, tuple(sorted(kwargs.items())))

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def resolve(self) -> Callable[..., Any] | None:
        """The constructor itself (imports its module)."""
        if self.module is None:
            return None
        mod = importlib.import_module(f"diffnas_jax.{self.module}")
        try:
            return getattr(mod, self.name)
        except AttributeError as e:
            raise ValueError(
                f"diffnas_jax.{self.module} has no constructor {self.name!r} (needed by this method)") from e

    def __call__(self, **overrides: Any) -> Any:
        ctor = self.resolve()
        if ctor is None:
            return None
        return ctor(**{**self.defaults, **overrides})

    def bind(self, **overrides: Any) -> Callable[..., Any] | None:
        """``functools.partial(constructor, **defaults, **overrides)`` — for components used as
        functions rather than constructors (selectors: ``m.selector.bind()(space, arch)``)."""
        fn = self.resolve()
        if fn is None:
            return None
        return functools.partial(fn, **{**self.defaults, **overrides})

    def __repr__(self) -> str:
        if self.module is None:
            return "None"
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.module}.{self.name}({args})"


NONE = Factory(None, None)


@dataclasses.dataclass(frozen=True)
class Method:
    """One differentiable-NAS method with its paper's default hyperparameters.

    Attributes:
      name: registry key.
      relaxation_factory: ``Factory`` of ``diffnas_jax.mixing``; calling it gives
        ``relax(arch, key, step) -> mix``.
      hypergrad_factory: ``Factory`` of ``diffnas_jax.hypergrad``; calling it gives the estimator.
      space_kwargs: keyword arguments for the space constructor (e.g. PC-DARTS
        ``partial_channels=4, edge_normalization=True``), for the space that supports them.
      default_space: the space the paper searched (``"darts"``, ``"mbconv"``); every method
        runs on every space.
      arch_lr, arch_betas, arch_eps, arch_weight_decay: Adam on the architecture logits, weight
        decay coupled (added to the gradient) as in ``torch.optim.Adam(weight_decay=...)``.
      weight_lr, weight_lr_min, weight_momentum, weight_nesterov, weight_weight_decay,
      grad_clip: SGD on the supernet weights with a cosine schedule from ``weight_lr`` to
        ``weight_lr_min``, coupled weight decay and global-norm clipping.
      weight_schedule_power: 1 for cosine annealing; > 1 for sharpDARTS's Cosine Power
        Annealing with that power (:func:`diffnas_jax.regularizers.cosine_power_annealing`).
      epochs, batch_size, warmup_epochs: search length, batch size and the number of initial
        epochs with frozen architecture (PC-DARTS 15, FBNet 10, ProxylessNAS 40).
      regularizer: ``Factory`` of ``diffnas_jax.regularizers`` (or ``NONE``): a term added to the
        architecture objective.
      selector: ``Factory`` of ``diffnas_jax.select`` (e.g. ``argmax``, ``threshold``); a
        function, not a constructor: ``m.selector.bind()(space, arch)``.
      paper: the reference.
      notes: where a default is not from the paper, or what the method needs.
    """

    name: str
    relaxation_factory: Factory
    hypergrad_factory: Factory
    space_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    default_space: str = "darts"
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_eps: float = 1e-8
    arch_weight_decay: float = 1e-3
    weight_lr: float = 0.025
    weight_lr_min: float = 0.001
    weight_momentum: float = 0.9
    weight_nesterov: bool = False
    weight_weight_decay: float = 3e-4
    grad_clip: float = 5.0
    weight_schedule_power: float = 1.0
    epochs: int = 50
    batch_size: int = 64
    warmup_epochs: int = 0
    regularizer: Factory = NONE
    selector: Factory = Factory.of("select", "argmax")
    paper: str = ""
    notes: str = ""

    def __post_init__(self):
        object.__setattr__(self, "space_kwargs", dict(self.space_kwargs))
        for field in ("arch_lr", "weight_lr"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"`{field}` must be a positive number, got {v!r}")
        if not isinstance(self.weight_schedule_power, (int, float)) or self.weight_schedule_power < 1:
            raise ValueError(f"`weight_schedule_power` must be >= 1, got {self.weight_schedule_power!r}")
        for field in ("arch_weight_decay", "weight_weight_decay", "weight_lr_min", "weight_momentum",
                      "grad_clip", "warmup_epochs"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"`{field}` must be a non-negative number, got {v!r}")
        if len(tuple(self.arch_betas)) != 2 or not all(0 <= b < 1 for b in self.arch_betas):
            raise ValueError(f"`arch_betas` must be two numbers in [0, 1), got {self.arch_betas!r}")
        for field in ("epochs", "batch_size"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{field}` must be a positive int, got {v!r}")

    def __hash__(self) -> int:
        return hash((self.name, self.relaxation_factory, self.hypergrad_factory))

    def relaxation(self, total_steps: int | None = None, steps_per_epoch: int | None = None,
                   **overrides: Any) -> Any:
        """The relaxation with the paper's options; schedules get the search length:
        ``total_steps`` (GDAS, small-temperature) and ``steps_per_epoch`` (SNAS/FBNet per-epoch
        annealing) are passed when the constructor takes them and they are given."""
        import inspect

        ctor = self.relaxation_factory.resolve()
        params = inspect.signature(ctor).parameters
        extra = {}
        if total_steps is not None and "total_steps" in params:
            extra["total_steps"] = total_steps
        if steps_per_epoch is not None and "steps_per_epoch" in params:
            extra["steps_per_epoch"] = steps_per_epoch
        return self.relaxation_factory(**{**extra, **overrides})

    # -- optax optimisers ---------------------------------------------------------------------
    def arch_optimizer(self) -> optax.GradientTransformation:
        """Adam on the architecture logits with coupled weight decay (DARTS ``Architect``)."""
        import optax

        b1, b2 = self.arch_betas
        parts = []
        if self.arch_weight_decay:
            parts.append(optax.add_decayed_weights(self.arch_weight_decay))
        parts.append(optax.adam(self.arch_lr, b1=b1, b2=b2, eps=self.arch_eps))
        return optax.chain(*parts)

    def weight_schedule(self, total_steps: int) -> optax.Schedule:
        """Cosine decay ``weight_lr -> weight_lr_min`` over ``total_steps`` (DARTS ``CosineAnnealingLR``),
        or Cosine Power Annealing when ``weight_schedule_power > 1``."""
        import optax

        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"`total_steps` must be a positive int, got {total_steps!r}")
        if self.weight_schedule_power > 1:
            from diffnas_jax.regularizers import cosine_power_annealing

            return cosine_power_annealing(self.weight_lr, self.weight_lr_min, total_steps,
                                          power=self.weight_schedule_power)
        return optax.cosine_decay_schedule(self.weight_lr, total_steps, alpha=self.weight_lr_min / self.weight_lr)

    def weight_optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """SGD with momentum, coupled weight decay, global-norm clipping and the cosine schedule."""
        import optax

        parts = []
        if self.grad_clip:
            parts.append(optax.clip_by_global_norm(self.grad_clip))
        if self.weight_weight_decay:
            parts.append(optax.add_decayed_weights(self.weight_weight_decay))
        parts.append(optax.sgd(self.weight_schedule(total_steps), momentum=self.weight_momentum or None,
                               nesterov=self.weight_nesterov))
        return optax.chain(*parts)

    def describe(self) -> dict[str, Any]:
        """A flat, printable summary (used for the BUILD_NOTES table)."""
        return {
            "name": self.name, "relaxation": repr(self.relaxation_factory),
            "hypergrad": repr(self.hypergrad_factory), "space_kwargs": dict(self.space_kwargs),
            "default_space": self.default_space,
            "arch_lr": self.arch_lr, "arch_betas": tuple(self.arch_betas),
            "arch_weight_decay": self.arch_weight_decay, "weight_lr": self.weight_lr,
            "weight_weight_decay": self.weight_weight_decay, "epochs": self.epochs,
            "batch_size": self.batch_size, "warmup_epochs": self.warmup_epochs,
            "regularizer": repr(self.regularizer), "selector": repr(self.selector), "paper": self.paper,
        }


R = lambda name, **kw: Factory.of("mixing", name, **kw)  # noqa: E731
H = lambda name, **kw: Factory.of("hypergrad", name, **kw)  # noqa: E731
O = lambda name, **kw: Factory.of("regularizers", name, **kw)  # noqa: E731
S = lambda name, **kw: Factory.of("select", name, **kw)  # noqa: E731

_DARTS = "Liu, Simonyan & Yang, DARTS: Differentiable Architecture Search, ICLR 2019"

_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add ``method`` to the registry (``ValueError`` if its name is taken and not ``overwrite``)."""
    if not isinstance(method, Method):
        raise TypeError(f"`method` must be a Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not overwrite:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


for _m in (
    Method("darts", R("softmax"), H("first_order"), paper=_DARTS + " (first order)",
           notes="arch Adam 3e-4 (0.5, 0.999) wd 1e-3; SGD 0.025 cosine to 1e-3, wd 3e-4, clip 5"),
    Method("darts_2nd", R("softmax"), H("unrolled", eta=0.025, weight_decay=3e-4, momentum=0.9),
           paper=_DARTS + " (second order)",
           notes="virtual step with eta = the weight lr (0.025; pass eta=schedule to follow a cosine), "
                 "weight decay 3e-4, momentum 0.9, finite-difference HVP as the reference (hvp='exact' available)"),
    Method("gdas", R("gdas", tau_max=10.0, tau_min=0.1), H("first_order"), epochs=250, batch_size=64,
           paper="Dong & Yang, Searching for a Robust Neural Architecture in Four GPU Hours, CVPR 2019",
           notes="tau linearly 10 -> 0.1 over the search; hard straight-through Gumbel"),
    Method("snas", R("snas", tau0=1.0, decay=0.97), H("single_level"), epochs=150,
           paper="Xie, Zheng, Liu & Lin, SNAS: Stochastic Neural Architecture Search, ICLR 2019",
           notes="soft Gumbel, tau 1.0 annealed by 0.97 per epoch; arch and weights on the same data"),
    Method("fbnet", R("fbnet", tau0=5.0, decay=0.956), H("first_order"), arch_lr=1e-2, arch_betas=(0.9, 0.999),
           arch_weight_decay=5e-4, weight_lr=0.1, weight_lr_min=0.0, weight_weight_decay=1e-4, epochs=90,
           batch_size=192, warmup_epochs=10, regularizer=O("fbnet_loss", alpha=0.2, beta=0.6),
           default_space="mbconv",
           paper="Wu et al., FBNet: Hardware-Aware Efficient ConvNet Design via Differentiable NAS, CVPR 2019",
           notes="tau 5.0 x exp(-0.045) per epoch; loss CE * 0.2 * log(LAT)^0.6"),
    Method("drnas", R("drnas"), H("first_order"), arch_lr=6e-4, weight_lr=0.1, weight_lr_min=0.0,
           batch_size=64,
           paper="Chen et al., DrNAS: Dirichlet Neural Architecture Search, ICLR 2021",
           notes="concentration elu(alpha)+1, reparameterised Dirichlet sample"),
    Method("fairdarts", R("fairdarts"), H("first_order"), regularizer=O("zero_one_loss", weight=10.0),
           selector=S("threshold", threshold=0.85),
           paper="Chu et al., Fair DARTS: Eliminating Unfair Advantages in Differentiable Architecture Search, ECCV 2020",
           notes="independent sigmoids; zero-one loss weight 10; decode sigma > 0.85"),
    Method("pcdarts", R("softmax"), H("first_order"), space_kwargs={"partial_channels": 4, "edge_normalization": True},
           arch_lr=6e-4, weight_lr=0.1, weight_lr_min=0.0, batch_size=256, warmup_epochs=15,
           paper="Xu et al., PC-DARTS: Partial Channel Connections for Memory-Efficient Architecture Search, ICLR 2020",
           notes="K=4 partial channels with shuffle, edge normalisation beta; arch updates after epoch 15"),
    Method("sparsemax", R("sparsemax"), H("first_order"),
           paper="Martins & Astudillo, From Softmax to Sparsemax, ICML 2016 (as the DARTS relaxation)",
           notes="DARTS hyperparameters (not given by a NAS paper)"),
    Method("small_temp", R("small_temperature"), H("first_order"),
           paper="Zhang & Ding, Small Temperature is All You Need for Differentiable Architecture Search, PAKDD 2023",
           notes="sparse-noisy softmax with an exponentially decreasing temperature; DARTS optimisers"),
    Method("maxw", R("maxw"), H("first_order"), weight_schedule_power=10.0,
           paper="Hundt, Jain & Hager, sharpDARTS: Faster and More Accurate Differentiable Architecture Search, 2019",
           notes="Max-W reweighting; Cosine Power Annealing (p=10) for the weight learning rate"),
    Method("proxyless", R("proxyless", num_paths=2), H("first_order"), arch_lr=1e-3, arch_betas=(0.0, 0.999),
           arch_weight_decay=0.0, weight_lr=0.025, weight_lr_min=0.0, weight_nesterov=True,
           weight_weight_decay=4e-5, grad_clip=0.0, epochs=120, batch_size=256, warmup_epochs=40,
           regularizer=O("proxyless_loss", lam=0.1), default_space="mbconv",
           paper="Cai, Zhu & Han, ProxylessNAS: Direct Neural Architecture Search on Target Task and Hardware, ICLR 2019",
           notes="two sampled paths, binary-gate gradient; additive latency loss lambda 0.1"),
    Method("sddarts", R("softmax"), H("first_order"), regularizer=O("self_distillation", num_teachers=2,
                                                                   temperature=4.0, weight=1.0),
           paper="Zhu et al., Improving Differentiable Architecture Search via Self-Distillation, Neural Networks 2023",
           notes="KL to the averaged softened predictions of the last K supernet snapshots (voting teachers)"),
    Method("rarts", R("softmax"), H("rarts"),
           paper="Xiao, Lu, Lyu & Xin, RARTS: An Efficient First-Order Relaxed Architecture Search Method, IEEE Access 2022",
           notes="relaxed bilevel with a coupling term; DARTS optimisers"),
    Method("darts_pt", R("softmax"), H("first_order"), selector=S("perturbation"),
           paper="Wang et al., Rethinking Architecture Selection in Differentiable NAS, ICLR 2021",
           notes="DARTS search, perturbation-based selection with fine-tuning between edges"),
    Method("darts_implicit", R("softmax"), H("implicit"),
           paper="Zhang et al., iDARTS: Differentiable Architecture Search with Stochastic Implicit Gradients, ICML 2021",
           notes="implicit-function-theorem hypergradient (CG / Neumann); DARTS optimisers"),
):
    register_method(_m)
del _m


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str, **overrides: Any) -> Method:
    """The method ``name`` with its paper's defaults, optionally with fields replaced.

    Args:
      name: one of :func:`list_methods`.
      **overrides: ``Method`` fields to replace (e.g. ``arch_lr=1e-3``, ``epochs=10``).

    Raises:
      ValueError: unknown method (the message lists the known ones) or unknown field.
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a string, got {type(name).__name__}")
    # "PC-DARTS", "pc_darts" and "pcdarts" name the same method
    squash = lambda s: s.lower().replace("-", "").replace("_", "")  # noqa: E731
    key = {squash(k): k for k in _REGISTRY}.get(squash(name))
    if key is None:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}")
    method = _REGISTRY[key]
    if overrides:
        fields = {f.name for f in dataclasses.fields(Method)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown Method field(s) {bad} for method {name!r}; fields are {sorted(fields)}")
        method = dataclasses.replace(method, **overrides)
    return method
