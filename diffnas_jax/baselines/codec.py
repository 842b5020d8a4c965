"""Discrete codecs: architectures as tuples of categorical decisions.

Every discrete strategy (random, local search, evolution, BANANAS) works on a
:class:`CategoricalCodec` — a point is a tuple of ints, one per decision, and ``decode`` turns it
into the space's own genotype (a DARTS ``Genotype``, an NB201 arch string, an MBConv op list, a
user space's dict, a NAS-Bench-Graph ``(link, ops)`` pair). One-op and one-edge neighbourhoods
(White et al., "Exploring the Loss Landscape in Neural Architecture Search", UAI 2021) are both
"change one decision".
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Sequence

import jax
import numpy as np

Point = tuple[int, ...]


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator determined by a JAX PRNG key (host-side search loops are faster in numpy)."""
    data = np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                      else key).astype(np.uint32).ravel()
    return np.random.default_rng(np.random.SeedSequence(data.tolist()))


@dataclasses.dataclass(frozen=True)
class CategoricalCodec:
    """A product of categorical decisions.

    Attributes:
      cardinalities: number of options of each decision.
      decode_fn: point -> genotype in the space's own format.
      encode_fn: genotype -> point (optional; needed to start a search from a given genotype).
      name: readable name.
    """

    cardinalities: tuple[int, ...]
    decode_fn: Callable[[Point], Any]
    encode_fn: Callable[[Any], Point] | None = None
    name: str = "categorical"

    def __post_init__(self):
        if not self.cardinalities or min(self.cardinalities) < 1:
            raise ValueError(f"`cardinalities` must be positive ints, got {self.cardinalities}")

    @property
    def size(self) -> int:
        return int(np.prod([int(c) for c in self.cardinalities], dtype=object))

    def random(self, rng: np.random.Generator) -> Point:
        return tuple(int(rng.integers(c)) for c in self.cardinalities)

    def neighbours(self, point: Point) -> list[Point]:
        """All points that differ from ``point`` in exactly one decision."""
        out = []
        for i, c in enumerate(self.cardinalities):
            for v in range(c):
                if v != point[i]:
                    out.append(point[:i] + (v,) + point[i + 1:])
        return out

    def mutate(self, rng: np.random.Generator, point: Point) -> Point:
        """Change one decision (chosen among those with more than one option) to another value."""
        free = [i for i, c in enumerate(self.cardinalities) if c > 1]
        if not free:
            return point
        i = free[int(rng.integers(len(free)))]
        v = int(rng.integers(self.cardinalities[i] - 1))
        v = v + 1 if v >= point[i] else v
        return point[:i] + (v,) + point[i + 1:]

    def features(self, point: Point) -> np.ndarray:
        """One-hot encoding, concatenated over decisions (input of BANANAS-style predictors)."""
        out = np.zeros(sum(self.cardinalities), np.float32)
        offset = 0
        for v, c in zip(point, self.cardinalities):
            out[offset + v] = 1.0
            offset += c
        return out

    def decode(self, point: Point) -> Any:
        return self.decode_fn(tuple(int(v) for v in point))

    def encode(self, genotype: Any) -> Point:
        if self.encode_fn is None:
            raise NotImplementedError(f"codec {self.name!r} cannot encode genotypes")
        return tuple(self.encode_fn(genotype))

    def all_points(self) -> Sequence[Point]:
        """Every point (only sensible for small spaces, e.g. NB201's 15,625 cells)."""
        return list(itertools.product(*[range(c) for c in self.cardinalities]))


# --- codecs for the built-in spaces ----------------------------------------------------------

def nb201_codec(op_names: Sequence[str] | None = None) -> CategoricalCodec:
    """NAS-Bench-201 cells (Dong & Yang, ICLR 2020): 6 edges x 5 ops, arch strings
    ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` (the codec of :func:`diffnas_jax.spaces.nb201.search_space`)."""
    from diffnas_jax.spaces import nb201

    return nb201.search_space(op_names=nb201.NB201_OPS if op_names is None else op_names).codec()


def darts_codec(primitives: Sequence[str], steps: int = 4) -> CategoricalCodec:
    """DARTS cells (Liu et al., ICLR 2019): per cell type and node, a pair of distinct inputs and
    one non-``none`` op for each, i.e. the discrete genotypes the DARTS rule can produce."""
    ops = tuple(p for p in primitives if p != "none")
    pairs = [list(itertools.combinations(range(i + 2), 2)) for i in range(steps)]
    per_cell = [d for i in range(steps) for d in (len(pairs[i]), len(ops), len(ops))]

    def decode(p: Point):
        from diffnas_jax.spaces.genotypes import Genotype  # the reference namedtuple

        cells = []
        for c in range(2):
            q = p[c * len(per_cell):(c + 1) * len(per_cell)]
            cell = []
            for i in range(steps):
                a, b = pairs[i][q[3 * i]]
                cell += [(ops[q[3 * i + 1]], a), (ops[q[3 * i + 2]], b)]
            cells.append(cell)
        concat = list(range(2, 2 + steps))
        return Genotype(normal=cells[0], normal_concat=concat, reduce=cells[1], reduce_concat=concat)

    def encode(g) -> Point:
        out = []
        for cell in (g.normal, g.reduce):
            for i in range(steps):
                (op_a, a), (op_b, b) = sorted(cell[2 * i: 2 * i + 2], key=lambda t: t[1])
                if (a, b) not in pairs[i]:
                    raise ValueError(f"genotype node {i} has inputs {(a, b)}: not a pair of distinct earlier nodes")
                out += [pairs[i].index((a, b)), ops.index(op_a), ops.index(op_b)]
        return tuple(out)

    return CategoricalCodec(tuple(per_cell) * 2, decode, encode, name="darts")


def layerwise_codec(op_names: Sequence[str], num_layers: int,
                    allowed: Sequence[Sequence[int]] | None = None) -> CategoricalCodec:
    """Layer-wise spaces (MBConv / FBNet / ProxylessNAS): one op per layer; ``allowed[l]`` lists
    the op indices layer ``l`` may use (e.g. skip only where shapes allow)."""
    names = tuple(op_names)
    allowed = [tuple(range(len(names)))] * num_layers if allowed is None else [tuple(a) for a in allowed]

    def decode(p: Point) -> list[str]:
        return [names[allowed[i][v]] for i, v in enumerate(p)]

    def encode(g: Sequence[str]) -> Point:
        return tuple(allowed[i].index(names.index(op)) for i, op in enumerate(g))

    return CategoricalCodec(tuple(len(a) for a in allowed), decode, encode, name="layerwise")


def user_codec(space) -> CategoricalCodec:
    """Codec of a :func:`diffnas_jax.spaces.from_module` space: one decision per choice (an
    ``InputChoice`` with ``n_chosen > 1`` is one decision over the subsets)."""
    options = []
    for c in space.choices:
        if c.kind == "input" and c.n_chosen > 1:
            options.append([tuple(c.names[i] for i in s) for s in itertools.combinations(range(len(c.names)), c.n_chosen)])
        elif c.kind == "input":
            options.append([(n,) for n in c.names])
        elif c.kind == "width":
            options.append([int(n) for n in c.names])
        else:
            options.append(list(c.names))

    def decode(p: Point) -> dict:
        return {c.path: options[i][v] for i, (c, v) in enumerate(zip(space.choices, p))}

    def encode(g) -> Point:
        return tuple(options[i].index(g[c.path] if c.kind != "input" else tuple(g[c.path]))
                     for i, c in enumerate(space.choices))

    return CategoricalCodec(tuple(len(o) for o in options), decode, encode, name="user")


def codec_for(space) -> CategoricalCodec:
    """The codec of a search space: ``space.codec()`` (every space of the protocol has one)."""
    return space.codec()
