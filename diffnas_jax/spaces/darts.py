"""The DARTS CNN search space and evaluation network (Liu et al., "DARTS: Differentiable
Architecture Search", ICLR 2019; reference code github quark0/darts ``cnn/model_search.py``,
``cnn/model.py``), with the PC-DARTS switches (Xu et al., "PC-DARTS: Partial Channel Connections
for Memory-Efficient Architecture Search", ICLR 2020; the authors' ``model_search.py``).

``search_space(...)`` returns a :class:`DartsSearchSpace` following
:mod:`diffnas_jax.spaces.base`; ``eval_network(genotype, ...)`` returns a :class:`DartsEvalNetwork`
(the reference ``NetworkCIFAR``).  Both import and export the reference PyTorch ``state_dict``.

Layout and speed: inputs are NHWC.  The parameters of the edges leaving state ``j`` of a search
cell are stored stacked along a leading edge axis (``cells.L/edges_from_j``), and
:meth:`DartsSearchSpace.to_reference` unstacks them to the reference names ``cells.L._ops.E...``.
A cell runs its edges in one of two ways (:func:`default_cell_formulation`), on that one layout:
``"groups"``, every edge group in one ``vmap`` (5 mixed-op bodies per cell, wide batched
kernels; the weight-free parts of a group, the 3x3 pools and the PC-DARTS bypass, computed once
per state outside the ``vmap``, each edge applying its own BatchNorm to them), or ``"scan"``,
one ``lax.scan`` per stride over the cell's edges whose carry is the buffer of states (one body
per normal cell, two per reduction cell: a program ~3x smaller per normal cell that compiles
faster and steps slower; BUILD_NOTES section 5, round 4).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffnas_jax._checks import backend_default

from .base import (ARCH_PASSTHROUGH_KEY, SpaceDefaults, check_mix_matches, check_size_kwargs, leaf_candidates,
                   leaf_key)
from . import scaffold
from .darts_ops import FactorizedReduce, ReLUConvBN, is_identity, make_op, pool_3x3
from .genotypes import (EVAL_OPS, GENOTYPES, PRIMITIVES, Genotype, format_genotype, get_genotype,
                        parse_genotype, validate_genotype)
from .kernels import prefers_batched_input
from .layers import (BatchNorm2d, Conv2d, Linear, avg_pool, channel_shuffle, cotangent_barrier, global_avg_pool,
                     max_pool, state_barrier)

Array = jax.Array
PyTree = Any

__all__ = [
    "search_space", "eval_network", "DartsSearchSpace", "DartsEvalNetwork", "Genotype", "PRIMITIVES",
    "GENOTYPES", "parse_genotype", "format_genotype", "edge_offsets", "edge_weights", "default_cell_formulation",
    "CELL_FORMULATIONS",
]


# ---------------------------------------------------------------------------------------------
# Cell topology
# ---------------------------------------------------------------------------------------------
def edge_offsets(steps: int) -> list[int]:
    """Index of node ``i``'s first incoming edge in the (num_edges, num_ops) arch matrix."""
    return [2 * i + i * (i - 1) // 2 for i in range(steps)]


def _num_edges(steps: int) -> int:
    return sum(2 + i for i in range(steps))


def _targets(j: int, steps: int) -> list[int]:
    """The nodes fed by state ``j`` (0, 1: cell inputs; ``j >= 2``: node ``j - 2``)."""
    return list(range(max(0, j - 1), steps))


def _group_edges(j: int, steps: int) -> list[int]:
    off = edge_offsets(steps)
    return [off[i] + j for i in _targets(j, steps)]


def edge_weights(beta: Array, steps: int) -> Array:
    """PC-DARTS edge normalisation: softmax of ``beta`` (num_edges,) over each node's inputs."""
    off = edge_offsets(steps)
    return jnp.concatenate([jax.nn.softmax(beta[off[i]:off[i] + i + 2]) for i in range(steps)])


def _reductions(layers: int) -> list[int]:
    return [i for i in range(layers) if i in (layers // 3, 2 * layers // 3)]


def _check_input(x: Any, layers: int, where: str) -> Array:
    r = len(set(_reductions(layers)))
    return scaffold.check_nhwc(x, where, multiple=2 ** r,
                               why=f"the {r} reduction cells (layers {_reductions(layers)}) halve it with "
                                   "FactorizedReduce, which needs even sizes")


# ---------------------------------------------------------------------------------------------
# Search network (model_search.Network)
# ---------------------------------------------------------------------------------------------
class MixedOp(nn.Module):
    """Weighted sum of the candidate ops on one edge; PC-DARTS partial channels when ``k > 1``.

    ``x`` (N, H, W, C), ``w`` (num_ops,).  With ``k > 1`` the ops see the first ``C // k``
    channels, the others bypass (max-pooled 2x2 on stride-2 edges), then ``channel_shuffle(., k)``.
    The ``none`` op contributes exactly zero and is not computed.  ``shared``: the weight-free
    parts that depend on the edge's input only (:func:`_shared_parts`), computed once by the
    cell for every edge leaving a state instead of once per edge.
    """
    C: int
    stride: int
    primitives: tuple[str, ...]
    k: int
    train: bool

    @nn.compact
    def __call__(self, x: Array, w: Array, shared: dict[str, Array] | None = None) -> Array:
        shared = _shared_parts(x, self.C, self.stride, self.primitives, self.k) if shared is None else shared
        c_part = self.C // self.k
        xin = x[..., :c_part] if self.k > 1 else x
        w = w.astype(x.dtype)
        out = None
        for idx, name in enumerate(self.primitives):
            if name == "none":
                continue
            op = make_op(name, c_part, self.stride, affine=False, name=f"_ops.{idx}", pool_bn=True)
            if name in shared:
                # a pool shared by the edges: its BatchNorm's output is the same for all of them
                # (so are its statistics), and a weight per edge inside it would make one per edge
                y = w[idx] * op(xin, self.train, pooled=shared[name])
            elif isinstance(op, nn.Module):
                # the weight scales the op's closing BatchNorm: reverse mode then takes its gradient
                # and the op's scaled cotangent from BatchNorm's own sums and multiply, one pass over
                # the op's output fewer each (and again in a second-order tangent pass)
                y = op(xin, self.train, out_scale=w[idx])
            else:
                y = w[idx] * op(xin, self.train)
            out = y if out is None else out + y
        if out is None:
            out = jnp.zeros_like(xin[:, ::self.stride, ::self.stride, :])
        if self.k > 1:
            out = channel_shuffle(jnp.concatenate([out, shared["bypass"]], axis=-1), self.k)
        return out


def _shared_parts(x: Array, C: int, stride: int, primitives: tuple[str, ...], k: int) -> dict[str, Array]:
    """The pools of the pool ops and the PC-DARTS bypass of ``x`` (N, H, W, C): equal for every
    edge reading ``x``, so a cell computes them once per state (``nn.vmap`` then keeps them
    unbatched, and each edge only applies its own BatchNorm)."""
    c_part = C // k
    xin = x[..., :c_part] if k > 1 else x
    parts = {name: pool_3x3(name[:3], xin, stride) for name in primitives if name in ("max_pool_3x3", "avg_pool_3x3")}
    if k > 1:
        rest = x[..., c_part:]
        parts["bypass"] = max_pool(rest, 2, 2, 0) if stride > 1 else rest
    return parts


CELL_FORMULATIONS = ("scan", "groups")


def default_cell_formulation(backend: str | None = None) -> str:
    """How a search cell evaluates its edges on ``backend`` (default ``jax.default_backend()``):
    ``"groups"`` unless ``$DIFFNAS_DARTS_CELL`` says ``"scan"``.

    ``"groups"``: the edges leaving each state as one ``vmap`` (wide batched kernels, 5 mixed-op
    bodies per cell).  ``"scan"``: one ``lax.scan`` over the cell's stride-1 edges (a reduction
    cell: one more over its stride-2 edges), one body per (cell, stride): on CPU the weight step
    compiles 1.5-2.5x faster (C=16, 8 layers, batch 32: 48 s) but steps 1.5-2x slower at small
    sizes and 6x slower at that size (268 s against 45 s: the edges run one after another and
    XLA:CPU runs the loop body on one core; BUILD_NOTES section 5, round 4), so it suits short programs
    (tests, first steps), not searches.  Both give equal results up to float rounding and use the same
    parameter layout.  Chosen at trace time; ``backend`` is checked for future per-backend
    defaults.
    """
    backend = jax.default_backend() if backend is None else backend
    return backend_default("DIFFNAS_DARTS_CELL", CELL_FORMULATIONS, backend, "groups")


def _scan_phases(steps: int, reduction: bool) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """The cell's edges as scan phases ``(stride, [(edge, source state j, node i), ...])`` ordered
    by source state, the order of the stored ``edges_from_j`` groups (so their leaves need no
    permutation): every edge into node ``i`` leaves a state ``j < i + 2``, so node ``i`` is
    complete before the edges leaving it run.  A reduction cell's stride-2 edges (from the two
    inputs) form a phase of their own."""
    off = edge_offsets(steps)
    edges = [(off[i] + j, j, i) for j in range(steps + 1) for i in _targets(j, steps)]
    if not reduction:
        return [(1, edges)]
    return [(2, [t for t in edges if t[1] < 2]), (1, [t for t in edges if t[1] >= 2])]


class SearchCell(nn.Module):
    """A DARTS search cell: preprocess the two inputs, ``steps`` nodes each summing a mixed op on
    every earlier state, output the concatenation of the last ``multiplier`` nodes.

    ``formulation`` (:func:`default_cell_formulation` when ``None``) picks how the edges run;
    the parameters are stored per source state (``edges_from_j``, stacked along a leading edge
    axis) in both, so weights, checkpoints and the ``state_dict`` names do not depend on it.
    """
    steps: int
    multiplier: int
    C: int
    reduction: bool
    reduction_prev: bool
    primitives: tuple[str, ...]
    k: int
    train: bool
    formulation: str | None = None

    @nn.compact
    def __call__(self, s0: Array, s1: Array, w: Array, w_edge: Array | None) -> Array:
        if self.reduction_prev:
            s0 = FactorizedReduce(self.C, False, name="preprocess0")(s0, self.train)
        else:
            s0 = ReLUConvBN(self.C, 1, 1, 0, False, name="preprocess0")(s0, self.train)
        s1 = ReLUConvBN(self.C, 1, 1, 0, False, name="preprocess1")(s1, self.train)
        form = default_cell_formulation() if self.formulation is None else self.formulation
        if form not in CELL_FORMULATIONS:
            raise ValueError(f"`formulation` must be one of {CELL_FORMULATIONS} or None, got {form!r}")
        # init declares the parameters through the groups (their layout is the stored one).
        if form == "scan" and not self.is_initializing():
            nodes = self._scanned_edges(s0, s1, w, w_edge)
            return jnp.concatenate([nodes[i] for i in range(self.steps - self.multiplier, self.steps)], axis=-1)
        return self._grouped_edges(s0, s1, w, w_edge)

    def _grouped_edges(self, s0: Array, s1: Array, w: Array, w_edge: Array | None) -> Array:
        states = [s0, s1]
        partial: list[Array | None] = [None] * self.steps
        # The grouped depthwise convolution batches well only with a batched input (kernels.py).
        batched_input = prefers_batched_input()
        group_cls = nn.vmap(MixedOp, in_axes=(0 if batched_input else None, 0, None), out_axes=0,
                            variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True})
        for j in range(self.steps + 1):
            if j >= 2:
                # one value and one cotangent per node: XLA:CPU would recompute the node's
                # elementwise chain inside every fusion that reads it (layers.state_barrier,
                # layers.cotangent_barrier)
                states.append(cotangent_barrier(state_barrier(partial[j - 2])))
            targets = _targets(j, self.steps)
            idx = np.asarray(_group_edges(j, self.steps))
            stride = 2 if self.reduction and j < 2 else 1
            group = group_cls(self.C, stride, self.primitives, self.k, self.train, name=f"edges_from_{j}")
            xs = jnp.broadcast_to(states[j], (len(idx),) + states[j].shape) if batched_input else states[j]
            ys = group(xs, w[idx], _shared_parts(states[j], self.C, stride, self.primitives, self.k))
            if w_edge is not None:
                ys = ys * w_edge[idx].astype(ys.dtype)[:, None, None, None, None]
            for p, i in enumerate(targets):
                partial[i] = ys[p] if partial[i] is None else partial[i] + ys[p]
        states.append(cotangent_barrier(partial[self.steps - 1]))
        return jnp.concatenate(states[-self.multiplier:], axis=-1)

    def _scanned_edges(self, s0: Array, s1: Array, w: Array, w_edge: Array | None) -> Array:
        """The nodes (steps, N, H', W', C): each phase of :func:`_scan_phases` is one ``lax.scan``
        whose body is one mixed op; its carry is the buffer of states, the edge reads state
        ``src`` and adds into node ``dst`` (dynamic slices)."""
        variables = self.variables
        update = self.train and self.is_mutable_collection("batch_stats")
        inputs = jnp.stack([s0, s1])
        nodes = None
        new_stats: dict[str, PyTree] = {}
        for stride, edges in _scan_phases(self.steps, self.reduction):
            groups = sorted({j for _, j, _ in edges})
            # the phase's edges are its groups' edges in their stored order: concatenate
            stacked = {}
            for col in ("params", "batch_stats"):
                trees = [variables.get(col, {}).get(f"edges_from_{j}", {}) for j in groups]
                stacked[col] = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *trees)
            eidx = np.asarray([e for e, _, _ in edges])
            if stride == 2:      # the two inputs feed the nodes
                src, dst, source = np.asarray([j for _, j, _ in edges]), np.asarray([i for _, _, i in edges]), inputs
                buf = jnp.zeros((self.steps,) + s0[:, ::2, ::2, :].shape, s0.dtype)
            elif self.reduction:  # node-to-node edges of a reduction cell: the nodes hold every source
                src, dst, source = np.asarray([j - 2 for _, j, _ in edges]), np.asarray([i for _, _, i in edges]), None
                buf = nodes
            else:                # a normal cell: one buffer of inputs and nodes
                src, dst, source = np.asarray([j for _, j, _ in edges]), np.asarray([i + 2 for _, _, i in edges]), None
                buf = jnp.concatenate([inputs, jnp.zeros((self.steps,) + s0.shape, s0.dtype)])
            buf, stats = self._scan_phase(stride, buf, source, stacked, w[eidx], None if w_edge is None else
                                          w_edge[eidx], src, dst, update)
            nodes = buf if self.reduction else buf[2:]
            if update:
                pos = 0
                for j in groups:
                    n = len(_targets(j, self.steps))
                    new_stats[f"edges_from_{j}"] = jax.tree_util.tree_map(lambda a: a[pos:pos + n], stats)
                    pos += n
        for name, tree in new_stats.items():
            if jax.tree_util.tree_leaves(tree):
                self.put_variable("batch_stats", name, tree)
        return nodes

    def _scan_phase(self, stride, buf, source, stacked, w, w_edge, src, dst, update):
        op = MixedOp(self.C, stride, self.primitives, self.k, self.train, parent=None)

        def body(buf, xs):
            params, stats, we, wedge, s, d = xs
            x = lax.dynamic_index_in_dim(buf if source is None else source, s, keepdims=False)
            variables = {"params": params, "batch_stats": stats}
            if update:
                y, upd = op.apply(variables, x, we, mutable=["batch_stats"])
                stats = upd.get("batch_stats", stats)
            else:
                y = op.apply(variables, x, we)
            if wedge is not None:
                y = y * wedge.astype(y.dtype)
            y = lax.dynamic_index_in_dim(buf, d, keepdims=False) + y
            return lax.dynamic_update_index_in_dim(buf, y, d, 0), (stats if update else None)

        xs = (stacked["params"], stacked["batch_stats"], w, w_edge, jnp.asarray(src, jnp.int32),
              jnp.asarray(dst, jnp.int32))
        return lax.scan(body, buf, xs)


class SearchNetwork(nn.Module):
    """The DARTS supernet (reference ``model_search.Network``) without its arch parameters."""
    C: int
    num_classes: int
    layers: int
    steps: int
    multiplier: int
    stem_multiplier: int
    primitives: tuple[str, ...]
    k: int
    train: bool
    cell_formulation: str | None = None

    @nn.compact
    def __call__(self, x, w_normal, w_reduce, e_normal=None, e_reduce=None):
        c_curr = self.stem_multiplier * self.C
        s = Conv2d(c_curr, 3, 1, 1, name="stem.0")(x)
        s = BatchNorm2d(True, name="stem.1")(s, self.train)
        s0 = s1 = s
        c_curr = self.C
        reduction_prev = False
        for i in range(self.layers):
            reduction = i in (self.layers // 3, 2 * self.layers // 3)
            if reduction:
                c_curr *= 2
            cell = SearchCell(self.steps, self.multiplier, c_curr, reduction, reduction_prev, self.primitives,
                              self.k, self.train, self.cell_formulation, name=f"cells.{i}")
            s0, s1 = s1, cell(s0, s1, w_reduce if reduction else w_normal, e_reduce if reduction else e_normal)
            reduction_prev = reduction
        return Linear(self.num_classes, name="classifier")(global_avg_pool(s1))


# ---------------------------------------------------------------------------------------------
# state_dict conversion
# ---------------------------------------------------------------------------------------------
def _reference_names(steps: int) -> scaffold.NameMap:
    """PyTorch module paths of a Flax module path: a group ``edges_from_j`` (the edges leaving
    state ``j``, stacked along a leading axis) unstacks to the reference ``_ops.E``."""
    def names(keys: tuple[str, ...]) -> list[tuple[str, int | None]]:
        for g, k in enumerate(keys):
            if k.startswith("edges_from_"):
                j = int(k[len("edges_from_"):])
                prefix, rest = ".".join(keys[:g]), ".".join(keys[g + 1:])
                return [(f"{prefix}._ops.{e}.{rest}", p) for p, e in enumerate(_group_edges(j, steps))]
        return [(".".join(keys), None)]

    return names


# ---------------------------------------------------------------------------------------------
# The search space object
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DartsSearchSpace(SpaceDefaults):
    """DARTS cell search space (see :func:`search_space`); methods are pure functions."""
    C: int = 16
    num_classes: int = 10
    layers: int = 8
    steps: int = 4
    multiplier: int = 4
    stem_multiplier: int = 3
    primitives: tuple[str, ...] = PRIMITIVES
    partial_channels: int = 1
    edge_normalization: bool = False

    # -- structure -----------------------------------------------------------------------------
    @property
    def num_edges(self) -> int:
        return _num_edges(self.steps)

    @property
    def arch_shapes(self) -> dict:
        """The arch pytree as ``jax.ShapeDtypeStruct`` leaves."""
        e, o = self.num_edges, len(self.primitives)
        spec = {"normal": jax.ShapeDtypeStruct((e, o), jnp.float32),
                "reduce": jax.ShapeDtypeStruct((e, o), jnp.float32)}
        if self.edge_normalization:
            spec[ARCH_PASSTHROUGH_KEY] = {"normal": jax.ShapeDtypeStruct((e,), jnp.float32),
                                          "reduce": jax.ShapeDtypeStruct((e,), jnp.float32)}
        return spec

    arch_spec = arch_shapes

    def module(self, train: bool) -> SearchNetwork:
        return SearchNetwork(self.C, self.num_classes, self.layers, self.steps, self.multiplier,
                             self.stem_multiplier, tuple(self.primitives), self.partial_channels, train)

    # -- protocol ------------------------------------------------------------------------------
    def init(self, key: Array, x: Array) -> tuple[PyTree, PyTree]:
        """Weights and BatchNorm state for NHWC example batch ``x`` (PyTorch default init:
        U(+-1/sqrt(fan_in)) convolutions and linear layers, BN scale 1, bias 0, mean 0, var 1).
        Jit-compiled; vmaps over ``key``."""
        x = _check_input(x, self.layers, "darts.init")
        return _init_search(self, key, x)

    def init_arch(self, key: Array) -> dict:
        """Architecture logits ``1e-3 * N(0, 1)`` as in DARTS: ``{"normal": (E, O), "reduce": (E, O)}``
        (E = 14 edges, O = 8 ops by default), plus ``{"beta": {"normal": (E,), "reduce": (E,)}}``
        with edge normalisation (PC-DARTS)."""
        e, o = self.num_edges, len(self.primitives)
        ks = jax.random.split(key, 4)
        arch = {"normal": 1e-3 * jax.random.normal(ks[0], (e, o)),
                "reduce": 1e-3 * jax.random.normal(ks[1], (e, o))}
        if self.edge_normalization:
            arch[ARCH_PASSTHROUGH_KEY] = {"normal": 1e-3 * jax.random.normal(ks[2], (e,)),
                                          "reduce": 1e-3 * jax.random.normal(ks[3], (e,))}
        return arch

    def apply(self, weights: PyTree, state: PyTree, mix: PyTree, x: Array, train: bool,
              *, rng: Array | None = None) -> tuple[Array, PyTree]:
        """Logits (N, num_classes) of the supernet with mixing weights ``mix`` (e.g. softmax of
        the arch logits; ``mix["beta"]`` holds raw edge-normalisation logits) and the new
        BatchNorm state (updated running statistics when ``train``; unchanged otherwise).
        ``rng`` is unused (the supernet is deterministic)."""
        check_mix_matches(self.arch_shapes, mix, name="mix")
        x = _check_input(x, self.layers, "darts.apply")
        e_normal = e_reduce = None
        if self.edge_normalization:
            e_normal = edge_weights(mix[ARCH_PASSTHROUGH_KEY]["normal"], self.steps)
            e_reduce = edge_weights(mix[ARCH_PASSTHROUGH_KEY]["reduce"], self.steps)
        return scaffold.flax_apply(self.module(bool(train)), weights, state, x, mix["normal"], mix["reduce"],
                                   e_normal, e_reduce, update_state=bool(train))

    def genotype(self, arch: PyTree) -> Genotype:
        """The reference rule: per node the two incoming edges with the largest best non-``none``
        weight of ``softmax(alpha)`` (times the softmax edge weight with edge normalisation, as
        in the PC-DARTS code), each with that best op; concat the last ``multiplier`` nodes."""
        check_mix_matches(self.arch_shapes, arch, name="arch")

        def parse(alpha, beta):
            w = np.asarray(jax.nn.softmax(jnp.asarray(alpha, jnp.float64 if jax.config.jax_enable_x64 else None),
                                          axis=-1))
            if beta is not None:
                w = w * np.asarray(edge_weights(jnp.asarray(beta), self.steps))[:, None]
            return _parse_weights(w, self.primitives, self.steps)

        beta = arch.get(ARCH_PASSTHROUGH_KEY) if self.edge_normalization else None
        concat = range(2 + self.steps - self.multiplier, self.steps + 2)
        return Genotype(normal=parse(arch["normal"], beta and beta["normal"]), normal_concat=concat,
                        reduce=parse(arch["reduce"], beta and beta["reduce"]), reduce_concat=concat)

    def topology_groups(self) -> dict[str, list[tuple[tuple[int, ...], int]]]:
        """Per cell type, each node's incoming edges (rows of the arch matrix) and how many the
        discrete cell keeps (2): the groups DARTS-PT prunes edge by edge
        (:func:`diffnas_jax.select.perturbation`)."""
        off = edge_offsets(self.steps)
        groups = [(tuple(range(off[i], off[i] + i + 2)), 2) for i in range(self.steps)]
        return {"normal": list(groups), "reduce": list(groups)}

    # -- codec ---------------------------------------------------------------------------------
    def arch_from_genotype(self, genotype: Genotype | str, scale: float = 1.0) -> dict:
        """Logits that :meth:`genotype` decodes back to ``genotype`` (in its order): per node
        ``2 * scale`` on the first chosen (edge, op), ``scale`` on the second, 0 elsewhere; an
        unused edge puts ``scale`` on ``none`` when the space has it.  With edge normalisation
        the betas are 0."""
        g = get_genotype(genotype)
        e, o = self.num_edges, len(self.primitives)
        off = edge_offsets(self.steps)
        arch = {}
        for cell in ("normal", "reduce"):
            pairs = list(getattr(g, cell))
            if len(pairs) != 2 * self.steps:
                raise ValueError(f"genotype.{cell} has {len(pairs) // 2} nodes, the space has steps={self.steps}")
            a = np.zeros((e, o), np.float32)
            if "none" in self.primitives:
                a[:, self.primitives.index("none")] = scale
            for i in range(self.steps):
                (op1, j1), (op2, j2) = pairs[2 * i], pairs[2 * i + 1]
                if j1 == j2:
                    raise ValueError(f"genotype.{cell} node {i} uses input {j1} twice; the DARTS supernet has one "
                                     "edge per input")
                for rank, (op, j) in enumerate(((op1, j1), (op2, j2))):
                    if op not in self.primitives or op == "none":
                        raise ValueError(f"genotype.{cell} node {i}: op {op!r} is not a non-'none' primitive of "
                                         f"this space {self.primitives}")
                    a[off[i] + j] = 0.0
                    a[off[i] + j, self.primitives.index(op)] = (2 - rank) * scale
            arch[cell] = jnp.asarray(a)
        if self.edge_normalization:
            arch[ARCH_PASSTHROUGH_KEY] = {"normal": jnp.zeros((e,)), "reduce": jnp.zeros((e,))}
        return arch

    def random_genotype(self, key: Array) -> Genotype:
        """Uniformly random cells of the form the DARTS rule produces: per node two distinct
        earlier states, each with a uniformly random non-``none`` op."""
        ops = [p for p in self.primitives if p != "none"]
        cells = []
        for ck in jax.random.split(key, 2):
            cell = []
            for i, nk in enumerate(jax.random.split(ck, self.steps)):
                k1, k2 = jax.random.split(nk)
                inputs = np.asarray(jax.random.choice(k1, i + 2, (2,), replace=False))
                choice = np.asarray(jax.random.randint(k2, (2,), 0, len(ops)))
                cell += [(ops[int(choice[0])], int(inputs[0])), (ops[int(choice[1])], int(inputs[1]))]
            cells.append(cell)
        concat = range(2 + self.steps - self.multiplier, self.steps + 2)
        return Genotype(normal=cells[0], normal_concat=concat, reduce=cells[1], reduce_concat=concat)

    def num_choices(self, arch: PyTree | None = None) -> int:
        """Number of distinct genotypes the DARTS rule can produce (both cells)."""
        nops = len([p for p in self.primitives if p != "none"])
        per_cell = 1
        for i in range(self.steps):
            per_cell *= (i + 2) * (i + 1) // 2 * nops * nops
        return per_cell ** 2

    def codec(self):
        """A :func:`diffnas_jax.baselines.codec.darts_codec` over this space's cells."""
        from diffnas_jax.baselines.codec import darts_codec

        return darts_codec(self.primitives, self.steps)

    def choice_labels(self, leaf: str) -> tuple[str, ...]:
        """The edges ``"i<-j"`` of the ``"normal"`` / ``"reduce"`` leaves in row order: node ``i``
        of the cell from ``c_{k-2}``, ``c_{k-1}`` (the two cell inputs) or an earlier node ``j``."""
        leaf_candidates("darts.choice_labels", leaf, {leaf_key("normal"): (), leaf_key("reduce"): ()})
        inputs = lambda j: ("c_{k-2}", "c_{k-1}")[j] if j < 2 else str(j - 2)  # noqa: E731
        return tuple(f"{i}<-{inputs(j)}" for i in range(self.steps) for j in range(i + 2))

    def candidate_names(self, leaf: str) -> tuple[str, ...]:
        """The primitives of the ``"normal"`` and ``"reduce"`` leaves (keystr paths)."""
        return leaf_candidates("darts.candidate_names", leaf,
                               {leaf_key("normal"): self.primitives, leaf_key("reduce"): self.primitives})

    def eval_network(self, genotype: Genotype | str, **size: Any) -> "DartsEvalNetwork":
        """The evaluation network (``NetworkCIFAR``) of ``genotype`` (see :func:`eval_network`:
        the paper's C=36, 20 layers unless ``size`` gives ``C``, ``layers``, ``num_classes``
        (default: this space's), ``auxiliary``, ``drop_path_prob``)."""
        check_size_kwargs("darts.eval_network", size, _EVAL_SIZE)
        return eval_network(genotype, **{"num_classes": self.num_classes, **size})

    # -- cost ----------------------------------------------------------------------------------
    def _cost_size(self, input_shape, size, where) -> dict:
        check_size_kwargs(where, size, ("C", "layers", "num_classes", "stem_multiplier", "auxiliary"))
        return {"C": self.C, "layers": self.layers, "num_classes": self.num_classes,
                "stem_multiplier": self.stem_multiplier, **size,
                "input_shape": tuple(input_shape) if input_shape is not None else (32, 32, 3)}

    def cost_table(self, input_shape: Sequence[int] | None = None, metric: str = "flops", **size: Any):
        """:class:`~diffnas_jax.cost.CostTable` ``{"normal": (E, O), "reduce": (E, O)}``: every
        supernet edge's candidate costs summed over the normal (reduction) cells (analytic; the
        space's ``C``/``layers`` unless ``size`` overrides them)."""
        from diffnas_jax.cost.analytic import darts_cost_table
        from diffnas_jax.cost.table import analytic_table, check_static_metric

        check_static_metric(metric)
        cfg = self._cost_size(input_shape, size, "darts.cost_table")
        per, const = darts_cost_table(metric=metric, steps=self.steps, multiplier=self.multiplier,
                                      primitives=self.primitives, **cfg)
        return analytic_table(per, const, metric)

    def network_cost(self, genotype: Genotype | str, input_shape: Sequence[int] | None = None, **size: Any):
        """:class:`~diffnas_jax.cost.Cost` of the evaluation network of ``genotype`` at this
        space's ``C``/``layers`` unless ``size`` overrides them (``auxiliary`` head excluded by
        default, as the papers count)."""
        from diffnas_jax.cost.analytic import darts_network_cost

        return darts_network_cost(get_genotype(genotype), **self._cost_size(input_shape, size, "darts.network_cost"))

    # -- reference interop ---------------------------------------------------------------------
    def to_reference(self, weights: PyTree, state: PyTree) -> dict[str, np.ndarray]:
        """The reference ``Network.state_dict()`` as numpy arrays (PyTorch names and layouts)."""
        return scaffold.to_reference(weights, state, _reference_names(self.steps))

    def from_reference(self, state_dict: dict) -> tuple[PyTree, PyTree]:
        """``(weights, state)`` from a reference ``state_dict`` (dict of arrays); exact inverse of
        :meth:`to_reference`; ``ValueError`` on missing, unexpected or mis-shaped entries."""
        return scaffold.from_reference(state_dict, _search_template(self), "darts.from_reference",
                                       _reference_names(self.steps), optional=())


_EVAL_SIZE = ("C", "num_classes", "layers", "auxiliary", "drop_path_prob")


def _parse_weights(W: np.ndarray, primitives: Sequence[str], steps: int) -> list[tuple[str, int]]:
    none = primitives.index("none") if "none" in primitives else -1
    gene = []
    start, n = 0, 2
    for i in range(steps):
        rows = W[start:start + n]

        def best(row):
            k_best = None
            for k in range(len(row)):
                if k != none and (k_best is None or row[k] > row[k_best]):
                    k_best = k
            return k_best

        edges = sorted(range(i + 2), key=lambda x: -rows[x][best(rows[x])])[:2]
        for j in edges:
            gene.append((primitives[best(rows[j])], j))
        start += n
        n += 1
    return gene


def _dummy_mix(space: DartsSearchSpace, dtype) -> dict:
    return jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, dtype), space.arch_shapes)


def _module_init_search(space: DartsSearchSpace, key: Array, x: Array):
    mix = _dummy_mix(space, x.dtype)
    beta = mix.get(ARCH_PASSTHROUGH_KEY)
    return space.module(False).init(
        {"params": key}, x, mix["normal"], mix["reduce"],
        None if beta is None else edge_weights(beta["normal"], space.steps),
        None if beta is None else edge_weights(beta["reduce"], space.steps))


def _edge_group_axes(path: tuple[str, ...]) -> int:
    """Leaves of a vmapped edge group (``edges_from_j``) stack one copy per edge on axis 0."""
    return int(any(k.startswith("edges_from_") for k in path))


def _init_search(space: DartsSearchSpace, key: Array, x: Array):
    # Shapes by eval_shape and one uniform draw (scaffold.torch_default_init): jitting
    # module.init compiled the whole forward pass plus a PRNG kernel per parameter, minutes on CPU.
    return scaffold.flax_init(lambda k: _module_init_search(space, k, x), key, _edge_group_axes)


@functools.lru_cache(maxsize=16)
def _search_template(space: DartsSearchSpace):
    n = 2 ** len(set(_reductions(space.layers)))
    x = jax.ShapeDtypeStruct((2, 2 * n, 2 * n, 3), jnp.float32)
    return jax.eval_shape(lambda k: _init_search(space, k, x), jax.random.key(0))


def search_space(C: int = 16, num_classes: int = 10, layers: int = 8, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, primitives: Sequence[str] = PRIMITIVES, partial_channels: int = 1,
                 edge_normalization: bool = False) -> DartsSearchSpace:
    """The DARTS CNN search space (Liu et al., ICLR 2019), optionally with PC-DARTS partial
    channels ``partial_channels = K`` and edge normalisation (Xu et al., ICLR 2020).

    Args:
      C: initial channels; ``layers`` cells, reduction cells at ``layers // 3`` and
        ``2 * layers // 3``; ``steps`` intermediate nodes; ``multiplier`` nodes concatenated;
        stem width ``stem_multiplier * C``.
      primitives: candidate op names (default the DARTS 8; any of
        :data:`~diffnas_jax.spaces.genotypes.EVAL_OPS`).
      partial_channels: K; each mixed op sees ``C / K`` channels (K=1: plain DARTS).
      edge_normalization: learn per-edge ``beta`` logits (arch key ``"beta"``).

    The arch pytree is ``{"normal": (E, O), "reduce": (E, O)}`` with ``E = sum(2 + i)`` edges
    (14 for 4 steps) in the reference order (node 0: inputs 0, 1; node 1: inputs 0, 1, 2; ...).
    """
    for name, v in (("C", C), ("num_classes", num_classes), ("layers", layers), ("steps", steps),
                    ("multiplier", multiplier), ("stem_multiplier", stem_multiplier),
                    ("partial_channels", partial_channels)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if multiplier > steps:
        raise ValueError(f"`multiplier`={multiplier} cannot exceed `steps`={steps}")
    primitives = tuple(primitives)
    for p in primitives:
        if p not in EVAL_OPS:
            raise ValueError(f"unknown op name {p!r} in `primitives`; expected names from {EVAL_OPS}")
    if len(set(primitives)) != len(primitives) or not [p for p in primitives if p != "none"]:
        raise ValueError(f"`primitives` must be distinct and hold a non-'none' op, got {primitives}")
    # Partial channels split every cell's channels into K groups (channel_shuffle needs C % K == 0
    # in the normal cells); the FactorizedReduce of skip_connect only runs in reduction cells, on
    # 2C/K and 4C/K channels, which are even whenever C % K == 0 (as in the authors' code).
    if C % partial_channels:
        raise ValueError(f"`C`={C} must be divisible by `partial_channels`={partial_channels} "
                         "(the mixed ops see C / partial_channels of the channels)")
    return DartsSearchSpace(int(C), int(num_classes), int(layers), int(steps), int(multiplier),
                            int(stem_multiplier), primitives, int(partial_channels), bool(edge_normalization))


# ---------------------------------------------------------------------------------------------
# Evaluation network (model.NetworkCIFAR)
# ---------------------------------------------------------------------------------------------
def _drop_path(module: nn.Module, x: Array, drop_prob: Array) -> Array:
    keep = 1.0 - drop_prob
    mask = jax.random.bernoulli(module.make_rng("drop_path"), keep, (x.shape[0], 1, 1, 1))
    return x / keep.astype(x.dtype) * mask.astype(x.dtype)


class EvalCell(nn.Module):
    """A discrete cell of ``genotype`` (reference ``model.Cell``) with drop-path on non-identity ops."""
    op_names: tuple[str, ...]
    indices: tuple[int, ...]
    concat: tuple[int, ...]
    C: int
    reduction: bool
    reduction_prev: bool
    train: bool
    use_drop_path: bool

    @nn.compact
    def __call__(self, s0: Array, s1: Array, drop_prob: Array) -> Array:
        if self.reduction_prev:
            s0 = FactorizedReduce(self.C, True, name="preprocess0")(s0, self.train)
        else:
            s0 = ReLUConvBN(self.C, 1, 1, 0, True, name="preprocess0")(s0, self.train)
        s1 = ReLUConvBN(self.C, 1, 1, 0, True, name="preprocess1")(s1, self.train)
        states = [s0, s1]
        for i in range(len(self.op_names) // 2):
            hs = []
            for n in (2 * i, 2 * i + 1):
                name, index = self.op_names[n], self.indices[n]
                stride = 2 if self.reduction and index < 2 else 1
                h = make_op(name, self.C, stride, affine=True, name=f"_ops.{n}")(states[index], self.train)
                if self.train and self.use_drop_path and not is_identity(name, stride):
                    h = _drop_path(self, h, drop_prob)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class AuxiliaryHeadCIFAR(nn.Module):
    """Reference ``AuxiliaryHeadCIFAR`` (input 8x8): ReLU, avg-pool 5/3, 1x1 conv 128, BN, ReLU,
    2x2 conv 768, BN, ReLU, linear."""
    num_classes: int
    train: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = avg_pool(jax.nn.relu(x), 5, 3, 0)
        x = Conv2d(128, 1, name="features.2")(x)
        x = jax.nn.relu(BatchNorm2d(True, name="features.3")(x, self.train))
        x = Conv2d(768, 2, name="features.5")(x)
        x = jax.nn.relu(BatchNorm2d(True, name="features.6")(x, self.train))
        return Linear(self.num_classes, name="classifier")(x.reshape(x.shape[0], -1))


class EvalNetworkCIFAR(nn.Module):
    """Reference ``NetworkCIFAR``: stem, ``layers`` cells, auxiliary head after cell ``2L//3``."""
    genotype: Genotype
    C: int
    num_classes: int
    layers: int
    auxiliary: bool
    train: bool
    use_drop_path: bool

    @nn.compact
    def __call__(self, x: Array, drop_prob: Array):
        g = self.genotype
        c_curr = 3 * self.C
        s = Conv2d(c_curr, 3, 1, 1, name="stem.0")(x)
        s = BatchNorm2d(True, name="stem.1")(s, self.train)
        s0 = s1 = s
        c_curr = self.C
        reduction_prev = False
        logits_aux = None
        for i in range(self.layers):
            reduction = i in (self.layers // 3, 2 * self.layers // 3)
            if reduction:
                c_curr *= 2
            pairs, concat = (g.reduce, g.reduce_concat) if reduction else (g.normal, g.normal_concat)
            cell = EvalCell(tuple(p[0] for p in pairs), tuple(int(p[1]) for p in pairs),
                            tuple(int(c) for c in concat), c_curr, reduction, reduction_prev, self.train,
                            self.use_drop_path, name=f"cells.{i}")
            s0, s1 = s1, cell(s0, s1, drop_prob)
            reduction_prev = reduction
            if i == 2 * self.layers // 3 and self.auxiliary and (self.train or self.is_initializing()):
                logits_aux = AuxiliaryHeadCIFAR(self.num_classes, self.train, name="auxiliary_head")(s1)
        logits = Linear(self.num_classes, name="classifier")(global_avg_pool(s1))
        return logits, logits_aux


def _freeze_genotype(g: Genotype) -> Genotype:
    return Genotype(tuple((str(o), int(i)) for o, i in g.normal), tuple(int(c) for c in g.normal_concat),
                    tuple((str(o), int(i)) for o, i in g.reduce), tuple(int(c) for c in g.reduce_concat))


@dataclasses.dataclass(frozen=True)
class DartsEvalNetwork:
    """The discrete DARTS evaluation network of a genotype (see :func:`eval_network`)."""
    genotype: Genotype
    C: int = 36
    num_classes: int = 10
    layers: int = 20
    auxiliary: bool = True
    drop_path_prob: float = 0.2

    def module(self, train: bool, use_drop_path: bool) -> EvalNetworkCIFAR:
        return EvalNetworkCIFAR(self.genotype, self.C, self.num_classes, self.layers, self.auxiliary, train,
                                use_drop_path)

    def _check(self, x):
        x = _check_input(x, self.layers, "darts.eval_network")
        if self.auxiliary and self.layers >= 3:
            h = x.shape[1] // 4 if len(set(_reductions(self.layers))) == 2 else x.shape[1]
            m = (h - 5) // 3 + 1 if h >= 5 else 0
            w = x.shape[2] // 4 if len(set(_reductions(self.layers))) == 2 else x.shape[2]
            mw = (w - 5) // 3 + 1 if w >= 5 else 0
            if m != 2 or mw != 2:
                raise ValueError(f"`x` spatial size {x.shape[1]}x{x.shape[2]} does not fit the CIFAR auxiliary head "
                                 "(it needs an 8x8 feature map, e.g. 32x32 inputs); use auxiliary=False")
        return x

    def init(self, key: Array, x: Array) -> tuple[PyTree, PyTree]:
        """Weights and BatchNorm state (PyTorch default init); jit-compiled, vmaps over ``key``."""
        return _init_eval(self, key, self._check(x))

    def apply(self, weights: PyTree, state: PyTree, mix: PyTree, x: Array, train: bool, *,
              rng: Array | None = None, drop_path_prob: float | Array | None = None):
        """Forward pass; ``mix`` is ignored (pass ``None``: the architecture is fixed).

        Returns ``(logits, state)``, except in train mode with ``auxiliary=True`` where it returns
        ``((logits, logits_aux), state)`` as the reference forward does (loss = CE(logits) + 0.4
        CE(logits_aux) in the DARTS training script).  In train mode with a positive drop-path
        probability (``drop_path_prob`` here, else the network's) ``rng`` is required: each
        non-identity op's output is zeroed per example with that probability and rescaled.
        """
        x = self._check(x)
        p = self.drop_path_prob if drop_path_prob is None else drop_path_prob
        use_dp = bool(train) and not (isinstance(p, (int, float)) and p == 0)
        if use_dp and rng is None:
            raise ValueError("`rng` is required in train mode with drop_path_prob > 0 (drop-path is random)")
        rngs = {"drop_path": rng} if use_dp else {}
        (logits, aux), state = scaffold.flax_apply(self.module(bool(train), use_dp), weights, state, x,
                                                   jnp.asarray(p, x.dtype), update_state=bool(train), rngs=rngs)
        return ((logits, aux) if train and self.auxiliary and aux is not None else logits), state

    def num_params(self, weights: PyTree, auxiliary: bool = True) -> int:
        """Number of trainable parameters (optionally without the auxiliary head)."""
        return int(sum(np.size(v) for k, v in weights.items() if auxiliary or k != "auxiliary_head"
                       for v in jax.tree_util.tree_leaves(v)))

    def to_reference(self, weights: PyTree, state: PyTree) -> dict[str, np.ndarray]:
        """The reference ``NetworkCIFAR.state_dict()`` as numpy arrays."""
        return scaffold.to_reference(weights, state)

    def from_reference(self, state_dict: dict) -> tuple[PyTree, PyTree]:
        """``(weights, state)`` from a reference ``NetworkCIFAR.state_dict()``."""
        return scaffold.from_reference(state_dict, _eval_template(self), "darts.eval_network.from_reference",
                                       optional=())


def _init_eval(net: DartsEvalNetwork, key: Array, x: Array):
    return scaffold.flax_init(lambda k: net.module(False, False).init({"params": k}, x, jnp.zeros((), x.dtype)), key)


@functools.lru_cache(maxsize=16)
def _eval_template(net: DartsEvalNetwork):
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda k: _init_eval(net, k, x), jax.random.key(0))


def eval_network(genotype: Genotype | str, C: int = 36, num_classes: int = 10, layers: int = 20,
                 auxiliary: bool = True, drop_path_prob: float = 0.2) -> DartsEvalNetwork:
    """The DARTS evaluation network (reference ``NetworkCIFAR``) of ``genotype``.

    ``genotype``: a :class:`Genotype`, a built-in name (``"DARTS_V2"``, ``"PC_DARTS"``, ...) or the
    reference text form.  Cells use ``len(genotype.normal) // 2`` nodes and concatenate the
    states in ``*_concat``; reduction cells at ``layers // 3`` and ``2 * layers // 3``; with
    ``auxiliary`` the CIFAR auxiliary head reads the output of cell ``2 * layers // 3`` in train
    mode (it needs 32x32 inputs).  DARTS_V2 at C=36, 20 layers, 10 classes has 3,349,342
    parameters without the auxiliary head and 3,825,768 with it.
    """
    g = get_genotype(genotype)
    validate_genotype(g)
    for name, v in (("C", C), ("num_classes", num_classes), ("layers", layers)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if isinstance(drop_path_prob, (int, float)) and not 0 <= drop_path_prob < 1:
        raise ValueError(f"`drop_path_prob` must be in [0, 1), got {drop_path_prob}")
    return DartsEvalNetwork(_freeze_genotype(g), int(C), int(num_classes), int(layers), bool(auxiliary),
                            float(drop_path_prob))
