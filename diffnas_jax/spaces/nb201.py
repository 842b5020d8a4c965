"""NAS-Bench-201 search space and evaluation network (Dong & Yang, "NAS-Bench-201: Extending the
Scope of Reproducible Neural Architecture Search", ICLR 2020).

The macro skeleton (``TinyNetwork``): a 3x3 stem conv + BN, three stages of ``N`` cells with ``C``,
``2C`` and ``4C`` channels separated by two ResNet basic blocks of stride 2, then BN-ReLU, global
average pooling and a linear classifier. The cell is a complete DAG over ``max_nodes`` nodes (4 by
default: 6 edges); on every edge one op of ``none, skip_connect, nor_conv_1x1, nor_conv_3x3,
avg_pool_3x3`` (5**6 = 15,625 cells).

Numerically equal to the reference PyTorch code (AutoDL-Projects ``TinyNetworkDarts`` with
``NAS201SearchCell`` and ``TinyNetwork`` with ``InferCell``):

- search-cell ops are built with ``affine=False``, so their convolutions carry a bias (``bias=not
  affine``) and their BatchNorms have no scale/shift (running statistics still tracked);
- the ResNet blocks, stem and final BN are affine; the stride-2 shortcut is
  ``AvgPool2d(2, 2)`` followed by a bias-free 1x1 conv;
- ``avg_pool_3x3`` excludes padded cells from the average (``count_include_pad=False``);
- BatchNorm in train mode normalises with the biased batch variance and updates the running
  variance with the unbiased one (momentum 0.1, eps 1e-5), counting ``num_batches_tracked``;
- edges are indexed in the reference order: the *sorted* edge keys ``'1<-0', '2<-0', '2<-1',
  '3<-0', ...``.

All arrays are NHWC inside; :meth:`NB201Space.from_reference` / :meth:`NB201Space.to_reference`
convert the reference ``state_dict`` (OIHW convolutions, ``(out, in)`` linear weights).
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax._checks import check_int_in_range
from diffnas_jax.spaces.base import SpaceDefaults, check_mix_matches, check_size_kwargs, leaf_candidates, leaf_key
from diffnas_jax.spaces import scaffold
from diffnas_jax.spaces.layers import (BatchNorm2d, Conv2d, Linear, PointwiseConv2d, ReLUConvBN, avg_pool, batch_norm,
                                       cotangent_barrier, global_avg_pool, max_pool, pointwise_conv,
                                       torch_uniform_init)
from diffnas_jax.spaces.scaffold import torch_default_init  # noqa: F401 - importable from here as before

__all__ = [
    "NB201_OPS", "KNOWN_OPS", "NB201Space", "NB201EvalNetwork", "search_space", "eval_network",
    "parse_arch_string", "format_arch_string", "parse_structure", "all_arch_strings", "edge_keys",
]

NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
#: every op the cells can build (the AutoDL-Projects ``OPS`` entries that make sense on a NB201 edge)
KNOWN_OPS = NB201_OPS + ("nor_conv_7x7", "max_pool_3x3")

PyTree = Any

# --------------------------------------------------------------------------------------------
# Ops and cells (layers from diffnas_jax.spaces.layers; NHWC / HWIO)
# --------------------------------------------------------------------------------------------


#: conv ops: kernel size and padding (stride 1 inside NB201 cells)
_CONV_OPS = {"nor_conv_1x1": (1, 0), "nor_conv_3x3": (3, 1), "nor_conv_7x7": (7, 3)}


def _param_free_op(name: str, x: jax.Array) -> jax.Array | None:
    """Ops without parameters on a stride-1 edge; ``None`` for ``none`` (exact zeros, left out
    of the sums: the reference multiplies by 0.0, which equals omitting the term for finite
    inputs)."""
    if name == "skip_connect":
        return x
    if name == "avg_pool_3x3":
        return avg_pool(x, 3, 1, 1)
    if name == "max_pool_3x3":
        return max_pool(x, 3, 1, 1)
    return None


class ResNetBasicBlock(nn.Module):
    """The stride-2 reduction block of NB201: ``conv_a`` (ReLU-Conv3x3/2-BN), ``conv_b``
    (ReLU-Conv3x3-BN), shortcut ``AvgPool2d(2, 2)`` + bias-free 1x1 conv; affine BNs."""

    planes: int
    stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = ReLUConvBN(self.planes, 3, self.stride, 1, name="conv_a")(x, train)
        y = ReLUConvBN(self.planes, 3, 1, 1, name="conv_b")(y, train)
        if self.stride == 2:
            r = PointwiseConv2d(self.planes, name="downsample.1")(avg_pool(x, 2, 2, 0))
        elif x.shape[-1] != self.planes:
            r = ReLUConvBN(self.planes, 1, 1, 0, name="downsample")(x, train)
        else:
            r = x
        return r + y


def edge_keys(max_nodes: int = 4) -> tuple[str, ...]:
    """Edge names in the reference's order: the keys ``'i<-j'`` sorted as strings (for
    ``max_nodes <= 10`` this is node-major order ``1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2``)."""
    return tuple(sorted(f"{i}<-{j}" for i in range(1, max_nodes) for j in range(i)))


def _edge_conv_init(c: int, k: int, affine: bool):
    """PyTorch default init of one edge's ReLUConvBN: ``{"op.1": {kernel[, bias]}[, "op.2"]}`` (conv, BN)."""
    def init(key, dtype):
        kk, kb = jax.random.split(key)
        fan_in = c * k * k
        p = {"op.1": {"kernel": torch_uniform_init(fan_in)(kk, (k, k, c, c), dtype)}}
        if not affine:
            p["op.1"]["bias"] = torch_uniform_init(fan_in)(kb, (c,), dtype)
        else:
            sdt = jnp.promote_types(dtype, jnp.float32)
            p["op.2"] = {"scale": jnp.ones((c,), sdt), "bias": jnp.zeros((c,), sdt)}
        return p

    return init


class NB201SearchCell(nn.Module):
    """Mixed cell: node ``i`` = sum over ``j < i`` of ``sum_k mix[e(i,j), k] * op_k(node_j)``;
    output the last node. ``mix`` is ``(num_edges, len(op_names))`` in :func:`edge_keys` order.

    Parameters are stored per edge and op (``"1<-0.2"``: ``conv`` kernel/bias, ``bn``), as in the
    reference. The computation groups the edges that leave the same node: one ReLU, one
    convolution per conv op with the kernels of all outgoing edges concatenated along the output
    channels, one BatchNorm over those channels, one pooling — the same numbers with a third of
    the operations (XLA compiles and runs the wide convolutions faster on CPU)."""

    channels: int
    max_nodes: int
    op_names: tuple[str, ...]
    affine: bool = False
    track_running_stats: bool = True
    momentum: float = 0.1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, mix: jax.Array, train: bool) -> jax.Array:
        c = self.channels
        index = {k: e for e, k in enumerate(edge_keys(self.max_nodes))}
        conv_ops = [(k, op) for k, op in enumerate(self.op_names) if op in _CONV_OPS]
        params, stats = {}, {}
        for key in edge_keys(self.max_nodes):
            for k, op in conv_ops:
                name = f"edges.{key}.{k}"
                params[name] = self.param(name, _edge_conv_init(c, _CONV_OPS[op][0], self.affine), x.dtype)
                if self.track_running_stats:
                    sdt = jnp.promote_types(x.dtype, jnp.float32)
                    stats[name] = self.variable("batch_stats", name, lambda: {"op.2": {
                        "mean": jnp.zeros((c,), sdt), "var": jnp.ones((c,), sdt),
                        "num_batches_tracked": jnp.zeros((), jnp.int32)}})
        update = train and self.track_running_stats and not self.is_initializing() \
            and self.is_mutable_collection("batch_stats")

        nodes = [x]
        pending: dict[int, jax.Array] = {}
        for j in range(self.max_nodes - 1):
            src = nodes[j]
            targets = list(range(j + 1, self.max_nodes))
            names = [f"{t}<-{j}" for t in targets]
            outs: dict[int, list[jax.Array]] = {}
            h = jax.nn.relu(src) if conv_ops else None
            weights = jnp.stack([mix[index[n]] for n in names])  # (targets, ops)
            for k, op in conv_ops:
                ksz, pad = _CONV_OPS[op]
                ids = [f"edges.{n}.{k}" for n in names]
                kern = jnp.concatenate([params[i]["op.1"]["kernel"] for i in ids], axis=-1)
                if ksz == 1:
                    y = pointwise_conv(h, kern)
                else:
                    y = jax.lax.conv_general_dilated(h, kern.astype(h.dtype), (1, 1), ((pad, pad), (pad, pad)),
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
                if not self.affine:
                    y = y + jnp.concatenate([params[i]["op.1"]["bias"] for i in ids]).astype(y.dtype)
                # each edge's mixing weight scales its channels inside the BatchNorm: reverse mode
                # then takes the weight's gradient from BatchNorm's own sums (layers.batch_norm)
                y = self._batch_norm(y, ids, params, stats, train, update, jnp.repeat(weights[:, k], c))
                outs[k] = [y[..., n * c:(n + 1) * c] for n in range(len(targets))]
            for k, op in enumerate(self.op_names):
                if op not in _CONV_OPS:
                    y = _param_free_op(op, src)
                    if y is not None:
                        outs[k] = [y] * len(targets)
            for n, t in enumerate(targets):
                edge = None
                for k in sorted(outs):
                    term = outs[k][n] if self.op_names[k] in _CONV_OPS else outs[k][n] * weights[n, k]
                    edge = term if edge is None else edge + term
                if edge is None:  # every op of the edge is "none"
                    edge = jnp.zeros_like(src)
                pending[t] = edge if t not in pending else pending[t] + edge
            # each node's cotangent once: otherwise XLA:CPU re-derives the chain of later nodes and
            # cells inside every convolution- and pool-gradient fusion (layers.cotangent_barrier)
            nodes.append(cotangent_barrier(pending.pop(j + 1)))
        return nodes[-1]

    def _batch_norm(self, y, ids, params, stats, train, update, out_scale):
        """BatchNorm2d over the concatenated channels of several edges (per-channel, so equal to
        one BN per edge), its output times ``out_scale`` (per channel: each edge's mixing weight),
        folded into the normalisation; running statistics are split back to their edges."""
        cat = lambda f: jnp.concatenate([f(i) for i in ids])  # noqa: E731
        if self.track_running_stats:
            mean, var = cat(lambda i: stats[i].value["op.2"]["mean"]), cat(lambda i: stats[i].value["op.2"]["var"])
        else:  # normalise with batch statistics in both modes; nothing to update
            sdt = jnp.promote_types(y.dtype, jnp.float32)
            mean, var = jnp.zeros(y.shape[-1], sdt), jnp.ones(y.shape[-1], sdt)
        scale = cat(lambda i: params[i]["op.2"]["scale"]) if self.affine else None
        bias = cat(lambda i: params[i]["op.2"]["bias"]) if self.affine else None
        out, new = batch_norm(y, mean, var, scale, bias, train or not self.track_running_stats,
                              self.momentum, self.eps, out_scale)
        if update:
            c = self.channels
            for e, i in enumerate(ids):
                sl = slice(e * c, (e + 1) * c)
                stats[i].value = {"op.2": {"mean": new[0][sl], "var": new[1][sl],
                                           "num_batches_tracked": stats[i].value["op.2"]["num_batches_tracked"] + 1}}
        return out


class NB201InferCell(nn.Module):
    """Discrete cell of a given structure (tuple of nodes, each a tuple of ``(op, input)``);
    layers are numbered in the order they appear in the structure (reference ``InferCell``)."""

    channels: int
    structure: tuple[tuple[tuple[str, int], ...], ...]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        nodes = [x]
        layer = 0
        for node_info in self.structure:
            node = None
            for op, j in node_info:
                if op in _CONV_OPS:
                    k, p = _CONV_OPS[op]
                    y = ReLUConvBN(self.channels, k, 1, p, name=f"layers.{layer}")(nodes[j], train)
                else:
                    y = _param_free_op(op, nodes[j])
                    if y is None:
                        y = jnp.zeros_like(nodes[j])
                layer += 1
                node = y if node is None else node + y
            nodes.append(cotangent_barrier(node))  # as in NB201SearchCell
        return nodes[-1]


def _stage_layout(C: int, N: int) -> list[tuple[int, bool]]:
    channels = [C] * N + [2 * C] + [2 * C] * N + [4 * C] + [4 * C] * N
    reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
    return list(zip(channels, reductions))


class TinyNetwork(nn.Module):
    """NB201 macro skeleton. With ``structure=None`` the cells are :class:`NB201SearchCell`
    (``TinyNetworkDarts``) and ``mix`` is required; otherwise :class:`NB201InferCell`.

    Input ``(B, H, W, C_in)`` NHWC with ``H, W`` multiples of 4; output logits ``(B, num_classes)``."""

    C: int
    N: int
    num_classes: int
    max_nodes: int = 4
    op_names: tuple[str, ...] = NB201_OPS
    affine: bool = False
    track_running_stats: bool = True
    structure: tuple | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mix: jax.Array | None, train: bool) -> jax.Array:
        h = Conv2d(self.C, 3, 1, 1, name="stem.0")(x)
        h = BatchNorm2d(name="stem.1")(h, train)
        for i, (c, reduction) in enumerate(_stage_layout(self.C, self.N)):
            if reduction:
                h = ResNetBasicBlock(c, 2, name=f"cells.{i}")(h, train)
            elif self.structure is None:
                h = NB201SearchCell(c, self.max_nodes, self.op_names, self.affine, self.track_running_stats,
                                    name=f"cells.{i}")(h, mix, train)
            else:
                h = NB201InferCell(c, self.structure, name=f"cells.{i}")(h, train)
        h = jax.nn.relu(BatchNorm2d(name="lastact.0")(h, train))
        return Linear(self.num_classes, name="classifier")(global_avg_pool(h))

# --------------------------------------------------------------------------------------------
# Arch strings
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"^([A-Za-z0-9_]+)~(\d+)$")


def parse_structure(arch_string: str, op_names: Sequence[str] = KNOWN_OPS) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Parse a NAS-Bench-201 arch string ``|op~j|...|+|...|`` into nodes of ``(op, input)`` pairs
    (reference ``Structure.str2structure``); every input index must point before its node."""
    if not isinstance(arch_string, str):
        raise TypeError(f"`arch_string` must be a str, got {type(arch_string).__name__}")
    s = arch_string.strip()
    if not s:
        raise ValueError("`arch_string` is empty")
    nodes = []
    for n, node_str in enumerate(s.split("+")):
        if len(node_str) < 2 or not (node_str.startswith("|") and node_str.endswith("|")):
            raise ValueError(f"malformed arch string {arch_string!r}: node {n + 1} {node_str!r} must be "
                             "written |op~j|op~j|...|")
        items = []
        for tok in node_str[1:-1].split("|"):
            m = _TOKEN.match(tok)
            if m is None:
                raise ValueError(f"malformed arch string {arch_string!r}: node {n + 1} has token {tok!r}, "
                                 "expected 'op~input'")
            op, j = m.group(1), int(m.group(2))
            if op not in op_names:
                raise ValueError(f"arch string {arch_string!r}: node {n + 1} uses unknown op {op!r}; "
                                 f"known ops are {tuple(op_names)}")
            if j > n:
                raise ValueError(f"arch string {arch_string!r}: node {n + 1} takes input {j}, which is not "
                                 f"an earlier node (inputs must be < {n + 1})")
            items.append((op, j))
        nodes.append(tuple(items))
    return tuple(nodes)


def parse_arch_string(arch_string: str, op_names: Sequence[str] = NB201_OPS, max_nodes: int = 4) -> tuple[str, ...]:
    """Ops of a complete NB201 cell in :func:`edge_keys` order (``1<-0, 2<-0, 2<-1, 3<-0, ...``).

    Node ``i`` must list its inputs ``0..i-1`` in order. ``ValueError`` names the node and token
    for a malformed string, an unknown op or a missing/misplaced edge."""
    nodes = parse_structure(arch_string, op_names)
    if len(nodes) != max_nodes - 1:
        raise ValueError(f"arch string {arch_string!r} has {len(nodes)} nodes, expected {max_nodes - 1} "
                         f"(max_nodes={max_nodes})")
    ops = {}
    for n, node_info in enumerate(nodes):
        i = n + 1
        if [j for _, j in node_info] != list(range(i)):
            raise ValueError(f"arch string {arch_string!r}: node {i} must list inputs 0..{i - 1} in order, "
                             f"got {[j for _, j in node_info]}")
        for op, j in node_info:
            ops[f"{i}<-{j}"] = op
    return tuple(ops[k] for k in edge_keys(max_nodes))


def format_arch_string(ops: Sequence[str], max_nodes: int = 4) -> str:
    """Inverse of :func:`parse_arch_string`: ops in :func:`edge_keys` order -> arch string."""
    keys = edge_keys(max_nodes)
    ops = tuple(ops)
    if len(ops) != len(keys):
        raise ValueError(f"`ops` must hold {len(keys)} op names (one per edge), got {len(ops)}")
    for e, op in enumerate(ops):
        if not isinstance(op, str) or not re.fullmatch(r"[A-Za-z0-9_]+", op):
            raise ValueError(f"`ops[{e}]` (edge {keys[e]}) is not an op name: {op!r}")
    by_key = dict(zip(keys, ops))
    nodes = ["|" + "|".join(f"{by_key[f'{i}<-{j}']}~{j}" for j in range(i)) + "|" for i in range(1, max_nodes)]
    return "+".join(nodes)


def all_arch_strings(op_names: Sequence[str] = NB201_OPS, max_nodes: int = 4) -> list[str]:
    """Every cell of the space (15,625 for the NB201 defaults), in lexicographic op-index order."""
    n_edges = len(edge_keys(max_nodes))
    return [format_arch_string([op_names[i] for i in idx], max_nodes)
            for idx in itertools.product(range(len(op_names)), repeat=n_edges)]


# --------------------------------------------------------------------------------------------
# The space objects
# --------------------------------------------------------------------------------------------


def _check_input(x: Any, where: str) -> jax.Array:
    return scaffold.check_nhwc(x, where, multiple=4, why="the two stride-2 ResNet blocks halve it, and their conv "
                                                        "and 2x2 average-pool shortcut agree only on even sizes")


class _NetworkBase:
    """Shared protocol code; subclasses define ``module``."""

    def _run(self, weights, state, mix, x, train):
        return scaffold.flax_apply(self.module, weights, state, x, mix, bool(train), update_state=bool(train))

    def _init(self, key, x, mix):
        return scaffold.flax_init(lambda k: self.module.init(k, x, mix, False), key)

    def _reference_io(self, state_dict, input_channels, dtype, where):
        sd = dict(state_dict)
        if dtype is None:
            dtype = np.asarray(sd["stem.0.weight"]).dtype if "stem.0.weight" in sd else jnp.float32
        template = self._shapes((2, 8, 8, input_channels), dtype)
        return scaffold.from_reference(sd, template, where, ignore=("arch_parameters",), cast=True)

    def _shapes(self, x_shape: tuple[int, ...], dtype) -> tuple[PyTree, PyTree]:
        x = jax.ShapeDtypeStruct(x_shape, dtype)
        v = jax.eval_shape(lambda k: self.module.init(k, x, self._dummy_mix(dtype), False), jax.random.key(0))
        return v["params"], v.get("batch_stats", {})

    def _dummy_mix(self, dtype):
        return None

    def num_params(self, weights: PyTree) -> int:
        """Number of trainable parameters (BatchNorm running statistics excluded)."""
        return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(weights)))


@dataclasses.dataclass(frozen=True)
class NB201Space(SpaceDefaults, _NetworkBase):
    """The NAS-Bench-201 supernet (``TinyNetworkDarts``) as pure functions; see :func:`search_space`."""

    C: int = 16
    N: int = 5
    num_classes: int = 10
    max_nodes: int = 4
    op_names: tuple[str, ...] = NB201_OPS
    affine: bool = False
    track_running_stats: bool = True

    @property
    def module(self) -> TinyNetwork:
        return TinyNetwork(self.C, self.N, self.num_classes, self.max_nodes, self.op_names, self.affine,
                           self.track_running_stats)

    @property
    def edge_keys(self) -> tuple[str, ...]:
        return edge_keys(self.max_nodes)

    @property
    def num_edges(self) -> int:
        return len(self.edge_keys)

    @property
    def arch_shapes(self) -> dict:
        """``{"cell": ShapeDtypeStruct((num_edges, num_ops))}``."""
        return {"cell": jax.ShapeDtypeStruct((self.num_edges, len(self.op_names)), jnp.float32)}

    def _dummy_mix(self, dtype):
        return jnp.zeros((self.num_edges, len(self.op_names)), dtype)

    # -- protocol ------------------------------------------------------------------------------
    def init(self, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
        """Weights (``params``) and BatchNorm state (``batch_stats``) for NHWC inputs like ``x``
        (PyTorch default initialisation: kaiming-uniform convs/linears, BN scale 1, shift 0)."""
        x = _check_input(x, "nb201.init")
        return self._init(key, x, self._dummy_mix(x.dtype))

    def init_arch(self, key: jax.Array) -> dict:
        """``{"cell": 1e-3 * normal((num_edges, num_ops))}`` as in the reference (float32)."""
        return {"cell": 1e-3 * jax.random.normal(key, (self.num_edges, len(self.op_names)), jnp.float32)}

    def apply(self, weights: PyTree, state: PyTree, mix: PyTree, x: jax.Array, train: bool, *,
              rng: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
        """Logits ``(B, num_classes)`` of the supernet whose edge ``e`` computes
        ``sum_k mix["cell"][e, k] * op_k``; in train mode BN uses batch statistics and the updated
        running statistics are returned as the new state. ``rng`` is unused (no stochastic op)."""
        x = _check_input(x, "nb201.apply")
        check_mix_matches(self.arch_shapes, mix)
        return self._run(weights, state, jnp.asarray(mix["cell"]).astype(x.dtype), x, train)

    def genotype(self, arch: PyTree) -> str:
        """NB201 arch string of the per-edge argmax (over all ops, ``none`` included, as the
        reference ``TinyNetworkDarts.genotype``)."""
        check_mix_matches(self.arch_shapes, arch, name="arch")
        idx = np.argmax(np.asarray(arch["cell"]), axis=-1)
        return format_arch_string([self.op_names[i] for i in idx], self.max_nodes)

    # -- codec ---------------------------------------------------------------------------------
    def parse_arch_string(self, arch_string: str) -> tuple[str, ...]:
        return parse_arch_string(arch_string, self.op_names, self.max_nodes)

    def format_arch_string(self, ops: Sequence[str]) -> str:
        for e, op in enumerate(ops):
            if op not in self.op_names:
                raise ValueError(f"`ops[{e}]`: unknown op {op!r}; the space's ops are {self.op_names}")
        return format_arch_string(ops, self.max_nodes)

    def arch_from_genotype(self, genotype: str, scale: float = 10.0) -> dict:
        """Logits that decode to ``genotype``: ``scale`` on the chosen op of every edge, 0 elsewhere."""
        ops = self.parse_arch_string(genotype)
        idx = np.array([self.op_names.index(o) for o in ops])
        return {"cell": jnp.asarray(scale * np.eye(len(self.op_names), dtype=np.float32)[idx])}

    def random_genotype(self, key: jax.Array) -> str:
        """A uniformly random cell."""
        idx = np.asarray(jax.random.randint(key, (self.num_edges,), 0, len(self.op_names)))
        return format_arch_string([self.op_names[i] for i in idx], self.max_nodes)

    def all_genotypes(self) -> list[str]:
        """All ``num_ops ** num_edges`` cells (15,625 for NB201)."""
        return all_arch_strings(self.op_names, self.max_nodes)

    def num_choices(self, arch: PyTree | None = None) -> int:
        """Number of discrete cells in the space."""
        return len(self.op_names) ** self.num_edges

    def codec(self):
        """A :class:`diffnas_jax.baselines.codec.CategoricalCodec` over the 6 edges."""
        from diffnas_jax.baselines.codec import CategoricalCodec

        return CategoricalCodec((len(self.op_names),) * self.num_edges,
                                lambda p: format_arch_string([self.op_names[i] for i in p], self.max_nodes),
                                lambda s: tuple(self.op_names.index(o) for o in self.parse_arch_string(s)),
                                name="nb201")

    def candidate_names(self, leaf: str) -> tuple[str, ...]:
        """The op names of the ``"cell"`` leaf (``leaf`` is its keystr, ``"['cell']"``)."""
        return leaf_candidates("nb201.candidate_names", leaf, {leaf_key("cell"): self.op_names})

    def choice_labels(self, leaf: str) -> tuple[str, ...]:
        """The edges ``"i<-j"`` (node ``i`` from node ``j``) of the ``"cell"`` leaf, in row order."""
        leaf_candidates("nb201.choice_labels", leaf, {leaf_key("cell"): ()})
        return self.edge_keys

    def eval_network(self, genotype: str, **size: Any) -> "NB201EvalNetwork":
        """The discrete ``TinyNetwork`` of ``genotype`` (an arch string) with this space's ``C``,
        ``N`` and classes unless ``size`` overrides them (``C``, ``N``, ``num_classes``)."""
        check_size_kwargs("nb201.eval_network", size, ("C", "N", "num_classes"))
        kw = {"C": self.C, "N": self.N, "num_classes": self.num_classes, **size}
        return eval_network(str(genotype), **kw)

    # -- cost ----------------------------------------------------------------------------------
    def _cost_size(self, input_shape, size, where):
        check_size_kwargs(where, size, ("C", "N", "num_classes"))
        return {"C": self.C, "N": self.N, "num_classes": self.num_classes, **size,
                "input_shape": tuple(input_shape) if input_shape is not None else (32, 32, 3)}

    def cost_table(self, input_shape: Sequence[int] | None = None, metric: str = "flops", **size: Any):
        """:class:`~diffnas_jax.cost.CostTable` ``{"cell": (num_edges, num_ops)}``: each op's cost
        on one edge summed over every cell of the network (analytic; ``input_shape`` (H, W, C_in),
        default 32x32x3)."""
        from diffnas_jax.cost.analytic import nb201_cost_table
        from diffnas_jax.cost.table import analytic_table, check_static_metric

        check_static_metric(metric)
        cfg = self._cost_size(input_shape, size, "nb201.cost_table")
        per, const = nb201_cost_table(self.op_names, self.num_edges, metric=metric, **cfg)
        return analytic_table(per, const, metric)

    def network_cost(self, genotype: str, input_shape: Sequence[int] | None = None, **size: Any):
        """:class:`~diffnas_jax.cost.Cost` (MACs per example, parameters) of ``eval_network(genotype)``."""
        from diffnas_jax.cost.analytic import nb201_network_cost

        cfg = self._cost_size(input_shape, size, "nb201.network_cost")
        return nb201_network_cost(parse_structure(genotype), **cfg)

    # -- reference interop ---------------------------------------------------------------------
    def to_reference(self, weights: PyTree, state: PyTree) -> dict[str, np.ndarray]:
        """Reference ``TinyNetworkDarts.state_dict()`` (without ``arch_parameters``) as numpy arrays."""
        return scaffold.to_reference(weights, state)

    def from_reference(self, state_dict: Mapping[str, Any], *, input_channels: int = 3,
                       dtype=None) -> tuple[PyTree, PyTree]:
        """``(weights, state)`` from a reference ``state_dict`` (numpy arrays, PyTorch names and
        layouts); ``arch_parameters`` is ignored if present. ``dtype`` defaults to the dict's."""
        return self._reference_io(state_dict, input_channels, dtype, "nb201.from_reference")


@dataclasses.dataclass(frozen=True)
class NB201EvalNetwork(_NetworkBase):
    """A discrete NB201 network (``TinyNetwork`` with ``InferCell``); see :func:`eval_network`."""

    arch_string: str
    C: int = 16
    N: int = 5
    num_classes: int = 10

    @property
    def structure(self):
        return parse_structure(self.arch_string, KNOWN_OPS)

    @property
    def module(self) -> TinyNetwork:
        return TinyNetwork(self.C, self.N, self.num_classes, structure=self.structure)

    def init(self, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
        """Weights and BN state (all BNs affine, as in the reference ``TinyNetwork``)."""
        x = _check_input(x, "nb201.eval_network.init")
        return self._init(key, x, None)

    def apply(self, weights: PyTree, state: PyTree, mix: Any, x: jax.Array, train: bool, *,
              rng: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
        """Logits ``(B, num_classes)``; ``mix`` is ignored (pass ``None``)."""
        x = _check_input(x, "nb201.eval_network.apply")
        return self._run(weights, state, None, x, train)

    def genotype(self, arch: Any = None) -> str:
        return self.arch_string

    def to_reference(self, weights: PyTree, state: PyTree) -> dict[str, np.ndarray]:
        """Reference ``TinyNetwork.state_dict()`` (Flax modules carry the reference names)."""
        return scaffold.to_reference(weights, state)

    def from_reference(self, state_dict: Mapping[str, Any], *, input_channels: int = 3,
                       dtype=None) -> tuple[PyTree, PyTree]:
        return self._reference_io(state_dict, input_channels, dtype, "nb201.eval_network.from_reference")


def search_space(C: int = 16, N: int = 5, num_classes: int = 10, max_nodes: int = 4,
                 op_names: Sequence[str] = NB201_OPS, affine: bool = False,
                 track_running_stats: bool = True) -> NB201Space:
    """The NAS-Bench-201 supernet (Dong & Yang, ICLR 2020; reference ``TinyNetworkDarts``).

    Args:
      C: channels of the first stage (then ``2C``, ``4C``).
      N: search cells per stage (``3N + 2`` cells in all).
      num_classes: classifier outputs.
      max_nodes: nodes per cell including the input (``max_nodes * (max_nodes - 1) / 2`` edges).
      op_names: candidate ops per edge, a subset of :data:`KNOWN_OPS`.
      affine, track_running_stats: of the BatchNorms inside the edge ops (the reference default
        ``affine=False`` also gives their convolutions a bias).

    Returns:
      An :class:`NB201Space`: ``init(key, x) -> (weights, state)``, ``init_arch(key) ->
      {"cell": (num_edges, num_ops)}``, ``apply(weights, state, mix, x, train)``,
      ``genotype(arch) -> arch string``, ``from_reference`` / ``to_reference``, codec helpers.
    """
    check_int_in_range("C", C, 1, 1 << 16)
    check_int_in_range("N", N, 0, 1 << 10)
    check_int_in_range("num_classes", num_classes, 1, 1 << 20)
    check_int_in_range("max_nodes", max_nodes, 2, 64)
    op_names = tuple(op_names)
    if not op_names:
        raise ValueError("`op_names` must name at least one op")
    for k, op in enumerate(op_names):
        if op not in KNOWN_OPS:
            raise ValueError(f"`op_names[{k}]`: unknown op {op!r}; known ops are {KNOWN_OPS}")
    if len(set(op_names)) != len(op_names):
        raise ValueError(f"`op_names` has duplicates: {op_names}")
    return NB201Space(C, N, num_classes, max_nodes, op_names, bool(affine), bool(track_running_stats))


def eval_network(arch_string: str, C: int = 16, N: int = 5, num_classes: int = 10) -> NB201EvalNetwork:
    """The NAS-Bench-201 evaluation network of ``arch_string`` (reference ``TinyNetwork`` with
    ``InferCell``; Dong & Yang, ICLR 2020), same ``init`` / ``apply`` / ``from_reference``
    protocol as :func:`search_space` (``mix`` is ignored: pass ``None``).

    ``arch_string`` is any structure the reference accepts (``|op~j|...|+|...|``, inputs pointing
    to earlier nodes); ``ValueError`` names the node/token of a malformed one."""
    check_int_in_range("C", C, 1, 1 << 16)
    check_int_in_range("N", N, 0, 1 << 10)
    check_int_in_range("num_classes", num_classes, 1, 1 << 20)
    parse_structure(arch_string, KNOWN_OPS)
    return NB201EvalNetwork(arch_string.strip(), C, N, num_classes)
