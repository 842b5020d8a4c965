"""Discrete search strategies over any :class:`~diffnas_jax.baselines.codec.CategoricalCodec`.

Every NAS result should be reported beside random search (Yang et al., "NAS evaluation is
frustratingly hard", ICLR 2020; Li & Talwalkar, "Random Search and Reproducibility for NAS",
UAI 2019). Local search is a strong baseline on NAS benchmarks (White et al., "Exploring the
Loss Landscape in Neural Architecture Search", UAI 2021); regularised evolution is Real et al.,
"Regularized Evolution for Image Classifier Architecture Search", AAAI 2019; BANANAS is White,
Neiswanger & Savani, "BANANAS: Bayesian Optimization with Neural Architectures for NAS", AAAI 2021.

All strategies take an :data:`Evaluator`, ``evaluate(genotype) -> dict of metrics`` (train from
scratch, query a table, anything; a black box, unlike the differentiable search's
:class:`~diffnas_jax.search.objective.Objective`), maximise ``metrics[metric]`` (``mode="min"``
to minimise), spend at most ``budget`` *distinct* queries (a repeated architecture is answered from the cache and costs
nothing), are deterministic under the PRNG key, and return a :class:`History`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffnas_jax._checks import check_choice, check_int_in_range
from diffnas_jax.baselines.codec import CategoricalCodec, Point, numpy_rng

Evaluator = Callable[[Any], Mapping[str, float]]
"""A black-box evaluation of a discrete architecture: ``evaluate(genotype) -> {metric: value}``."""

__all__ = ["Evaluator", "History", "STRATEGIES", "get_strategy", "random_search", "local_search",
           "regularized_evolution", "bananas"]


@dataclasses.dataclass
class History:
    """Queries in order: ``points``, ``genotypes``, ``metrics`` (dicts) and ``values`` (the
    optimised metric, sign-corrected so that larger is better)."""

    points: list = dataclasses.field(default_factory=list)
    genotypes: list = dataclasses.field(default_factory=list)
    metrics: list = dataclasses.field(default_factory=list)
    values: list = dataclasses.field(default_factory=list)

    def best_so_far(self) -> np.ndarray:
        """Best value after each query, shape ``(num_queries,)``."""
        return np.maximum.accumulate(np.asarray(self.values, np.float64)) if self.values else np.zeros(0)

    @property
    def best(self) -> tuple[Any, Mapping[str, float]]:
        i = int(np.argmax(self.values))
        return self.genotypes[i], self.metrics[i]

    def __len__(self) -> int:
        return len(self.values)


class _Queries:
    """Caches queries and enforces the budget of distinct architectures."""

    def __init__(self, codec: CategoricalCodec, evaluate: Evaluator, budget: int, metric: str, mode: str):
        self.codec, self.evaluate, self.budget, self.metric = codec, evaluate, budget, metric
        self.sign = 1.0 if mode == "max" else -1.0
        self.cache: dict[Point, float] = {}
        self.history = History()

    @property
    def exhausted(self) -> bool:
        return len(self.history) >= self.budget or len(self.cache) >= self.codec.size

    def __call__(self, point: Point) -> float:
        if point in self.cache:
            return self.cache[point]
        genotype = self.codec.decode(point)
        metrics = dict(self.evaluate(genotype))
        if self.metric not in metrics:
            raise ValueError(f"`evaluate` returned {sorted(metrics)}; `metric` {self.metric!r} is missing")
        value = self.sign * float(metrics[self.metric])
        self.cache[point] = value
        h = self.history
        h.points.append(point), h.genotypes.append(genotype), h.metrics.append(metrics), h.values.append(value)
        return value


def _check(budget: int, mode: str) -> None:
    check_int_in_range("budget", budget, 1, 10**9)
    check_choice("mode", mode, ("max", "min"))


def random_search(codec: CategoricalCodec, evaluate: Evaluator, budget: int, key: jax.Array, *,
                  metric: str = "accuracy", mode: str = "max") -> History:
    """Uniform random sampling of ``budget`` distinct architectures."""
    _check(budget, mode)
    rng, ev = numpy_rng(key), _Queries(codec, evaluate, budget, metric, mode)
    while not ev.exhausted:
        ev(codec.random(rng))
    return ev.history


def local_search(codec: CategoricalCodec, evaluate: Evaluator, budget: int, key: jax.Array, *,
                 metric: str = "accuracy", mode: str = "max", num_init: int = 10,
                 first_improvement: bool = False) -> History:
    """Hill climbing over one-decision neighbourhoods with random restarts (White et al. 2021).

    Start from the best of ``num_init`` random architectures; evaluate its neighbours in random
    order and move to the best one (or the first improvement); at a local optimum restart from a
    fresh random architecture.
    """
    _check(budget, mode)
    check_int_in_range("num_init", num_init, 1, 10**9)
    rng, ev = numpy_rng(key), _Queries(codec, evaluate, budget, metric, mode)
    current, current_value = None, -np.inf
    for _ in range(num_init):
        if ev.exhausted:
            break
        p = codec.random(rng)
        v = ev(p)
        if v > current_value:
            current, current_value = p, v
    while not ev.exhausted:
        neighbours = codec.neighbours(current)
        order = rng.permutation(len(neighbours))
        best, best_value = None, current_value
        for i in order:
            if ev.exhausted:
                break
            v = ev(neighbours[i])
            if v > best_value:
                best, best_value = neighbours[i], v
                if first_improvement:
                    break
        if best is None:  # local optimum: restart
            current = codec.random(rng)
            current_value = ev(current) if not ev.exhausted else current_value
        else:
            current, current_value = best, best_value
    return ev.history


def regularized_evolution(codec: CategoricalCodec, evaluate: Evaluator, budget: int, key: jax.Array, *,
                          metric: str = "accuracy", mode: str = "max", population_size: int = 20,
                          sample_size: int = 5) -> History:
    """Aging evolution (Real et al. 2019): tournament of ``sample_size`` from the population,
    mutate the winner (one decision), add the child, remove the oldest member."""
    _check(budget, mode)
    check_int_in_range("population_size", population_size, 1, 10**9)
    check_int_in_range("sample_size", sample_size, 1, population_size)
    rng, ev = numpy_rng(key), _Queries(codec, evaluate, budget, metric, mode)
    population: list[tuple[Point, float]] = []
    while len(population) < population_size and not ev.exhausted:
        p = codec.random(rng)
        population.append((p, ev(p)))
    stall = 0
    while not ev.exhausted:
        idx = rng.choice(len(population), size=min(sample_size, len(population)), replace=False)
        parent = max((population[i] for i in idx), key=lambda t: t[1])[0]
        child = codec.mutate(rng, parent)
        before = len(ev.history)
        population.append((child, ev(child)))
        population.pop(0)
        # in a tiny, nearly exhausted space mutations can keep hitting the cache
        stall = stall + 1 if len(ev.history) == before else 0
        if stall > 100 * codec.size:
            break
    return ev.history


def _mlp_init(key, sizes):
    params = []
    for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        params.append((jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), jnp.zeros((n,))))
    return params


def _mlp(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return (x @ w + b)[..., 0]


@functools.lru_cache(maxsize=8)  # one compiled predictor per configuration, reused across runs
def _make_ensemble_fit(sizes, num_ensemble, steps, lr):
    opt = optax.adam(lr)

    def fit_one(key, x, y, mask):
        params = _mlp_init(key, sizes)
        state = opt.init(params)

        def loss(p):
            return jnp.sum(mask * (_mlp(p, x) - y) ** 2) / jnp.maximum(jnp.sum(mask), 1.0)

        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(body, (params, state), None, length=steps)
        return params

    @jax.jit
    def fit_and_predict(key, x, y, mask, candidates):
        keys = jax.random.split(key, num_ensemble)
        ens = jax.vmap(fit_one, in_axes=(0, None, None, None))(keys, x, y, mask)
        return jax.vmap(_mlp, in_axes=(0, None))(ens, candidates)  # (E, M)

    return fit_and_predict


def bananas(codec: CategoricalCodec, evaluate: Evaluator, budget: int, key: jax.Array, *,
            metric: str = "accuracy", mode: str = "max", num_init: int = 10, num_ensemble: int = 5,
            num_candidates: int = 100, batch_size: int = 5, hidden: int = 32, train_steps: int = 200,
            learning_rate: float = 1e-2) -> History:
    """Predictor-guided search in the style of BANANAS (White et al. 2021).

    An ensemble of MLPs (trained jointly in one ``vmap``) on the one-hot encoding predicts the
    metric; candidates are mutations of the best architectures so far; the ``batch_size``
    candidates with the highest independent-Thompson-sampling score (a draw from the Gaussian of
    the ensemble's mean and spread) are queried each round. (BANANAS's path encoding is replaced
    by the codec's one-hot encoding, which every space has.)
    """
    _check(budget, mode)
    check_int_in_range("num_init", num_init, 1, 10**9)
    check_int_in_range("num_ensemble", num_ensemble, 2, 1000)
    rng, ev = numpy_rng(key), _Queries(codec, evaluate, budget, metric, mode)
    while len(ev.history) < min(num_init, budget) and not ev.exhausted:
        ev(codec.random(rng))
    dim = sum(codec.cardinalities)
    fit = _make_ensemble_fit((dim, hidden, hidden, 1), num_ensemble, train_steps, learning_rate)
    # padded to the budget so the predictor compiles once
    x = np.zeros((budget, dim), np.float32)
    y = np.zeros((budget,), np.float32)
    mask = np.zeros((budget,), np.float32)
    jkey = jax.random.fold_in(key, 1)
    round_ = 0
    while not ev.exhausted:
        n = len(ev.history)
        for i in range(n):
            x[i] = codec.features(ev.history.points[i])
        vals = np.asarray(ev.history.values, np.float32)
        mu, sd = float(vals.mean()), float(vals.std() + 1e-8)
        y[:n] = (vals - mu) / sd
        mask[:] = 0.0
        mask[:n] = 1.0
        order = np.argsort(-vals)[:10]
        cands, seen = [], set(ev.cache)
        tries = 0
        while len(cands) < num_candidates and tries < 20 * num_candidates:
            tries += 1
            parent = ev.history.points[order[int(rng.integers(len(order)))]]
            child = codec.mutate(rng, parent)
            if rng.random() < 0.5:
                child = codec.mutate(rng, child)
            if child not in seen:
                seen.add(child)
                cands.append(child)
        if not cands:
            cands = [codec.random(rng) for _ in range(num_candidates)]
        feats = np.zeros((num_candidates, dim), np.float32)
        for i, c in enumerate(cands):
            feats[i] = codec.features(c)
        preds = np.asarray(fit(jax.random.fold_in(jkey, round_), x, y, mask, feats))[:, : len(cands)]
        score = preds.mean(0) + preds.std(0) * rng.standard_normal(len(cands))
        for i in np.argsort(-score)[:batch_size]:
            if ev.exhausted:
                break
            ev(cands[i])
        round_ += 1
    return ev.history


STRATEGIES = {
    "random": random_search,
    "local_search": local_search,
    "evolution": regularized_evolution,
    "bananas": bananas,
}


def get_strategy(name: str) -> Callable[..., History]:
    """A strategy by name: ``random``, ``local_search``, ``evolution``, ``bananas``."""
    check_choice("strategy", name, tuple(STRATEGIES))
    return STRATEGIES[name]


def __getattr__(name: str) -> Any:
    if name == "Objective":
        import warnings

        warnings.warn("diffnas_jax.baselines.strategies.Objective is deprecated: it is now `Evaluator` "
                      "(\"objective\" is the differentiable search's loss, diffnas_jax.search.objective)",
                      DeprecationWarning, stacklevel=2)
        return Evaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
