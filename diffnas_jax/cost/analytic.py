"""Analytic FLOPs (multiply-adds) and parameter counts from op shapes.

The DARTS evaluation network (``NetworkCIFAR`` of Liu et al., ICLR 2019, ``cnn/model.py``) and
the NAS-Bench-201 ``TinyNetwork`` (Dong & Yang, ICLR 2020), op by op, so that a cost is known
without building the network and so that a per-decision table gives a differentiable expected
cost. FLOPs count the multiply-adds of convolutions and linear layers (not BatchNorm,
activations, pooling or additions), as the papers do; parameters include BatchNorm scale/shift.
Both are checked against counting the built networks (tests/test_cost.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Cost:
    """``flops``: multiply-adds for one input example; ``params``: trainable scalars."""

    flops: int = 0
    params: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.params + other.params)

    def __mul__(self, n: int) -> "Cost":
        return Cost(self.flops * n, self.params * n)

    __rmul__ = __mul__

    def get(self, metric: str) -> int:
        if metric not in ("flops", "params"):
            raise ValueError(f"unknown `metric` {metric!r}; expected 'flops' or 'params'")
        return getattr(self, metric)


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv(h_out: int, w_out: int, c_in: int, c_out: int, k: int = 1, kw: int | None = None, groups: int = 1,
         bias: bool = False) -> Cost:
    kw = k if kw is None else kw
    per = k * kw * (c_in // groups) * c_out
    return Cost(h_out * w_out * per, per + (c_out if bias else 0))


def bn(c: int, affine: bool = True) -> Cost:
    return Cost(0, 2 * c if affine else 0)


def linear(c_in: int, c_out: int, bias: bool = True) -> Cost:
    return Cost(c_in * c_out, c_in * c_out + (c_out if bias else 0))


# ---------------------------------------------------------------------------------------------
# DARTS
# ---------------------------------------------------------------------------------------------
DARTS_PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                    "dil_conv_3x3", "dil_conv_5x5")


def darts_op(op: str, c: int, h: int, w: int, stride: int, affine: bool = True) -> Cost:
    """Cost of a DARTS op with ``c`` channels in and out on an ``h x w`` input (``cnn/operations.py``)."""
    if op in ("none", "max_pool_3x3", "avg_pool_3x3"):
        return Cost()
    if op == "skip_connect":
        if stride == 1:
            return Cost()
        return factorized_reduce(c, c, h, w, affine)
    if op.startswith("sep_conv_"):
        k = int(op[-1])
        h1, w1 = out_size(h, k, stride, k // 2), out_size(w, k, stride, k // 2)
        one = conv(h1, w1, c, c, k, groups=c) + conv(h1, w1, c, c) + bn(c, affine)
        return 2 * one
    if op.startswith("dil_conv_"):
        k = int(op[-1])
        h1, w1 = out_size(h, k, stride, k - 1, 2), out_size(w, k, stride, k - 1, 2)
        return conv(h1, w1, c, c, k, groups=c) + conv(h1, w1, c, c) + bn(c, affine)
    if op == "conv_7x1_1x7":
        h1, w1 = out_size(h, 7, stride, 3), out_size(w, 7, stride, 3)
        return conv(h, w1, c, c, 1, 7) + conv(h1, w1, c, c, 7, 1) + bn(c, affine)
    raise ValueError(f"unknown DARTS op {op!r}; known ops are {DARTS_PRIMITIVES + ('conv_7x1_1x7',)}")


def factorized_reduce(c_in: int, c_out: int, h: int, w: int, affine: bool = True) -> Cost:
    """ReLU, two 1x1 stride-2 convs to ``c_out / 2`` each (one on the input shifted by a pixel),
    concatenated, BatchNorm."""
    ho, wo = out_size(h, 1, 2, 0), out_size(w, 1, 2, 0)
    return 2 * conv(ho, wo, c_in, c_out // 2) + bn(c_out, affine)


def _relu_conv_bn(c_in, c_out, h, w, affine=True) -> Cost:
    return conv(h, w, c_in, c_out) + bn(c_out, affine)


def _darts_cells(C: int, layers: int, input_hw: tuple[int, int], stem_multiplier: int, multiplier: int):
    """Per cell: (reduction, reduction_prev, C_pp, C_p, C_cell, (h_pp, w_pp), (h, w))."""
    c_curr = stem_multiplier * C
    c_pp, c_p, c_curr = c_curr, c_curr, C
    hw_pp = hw_p = tuple(input_hw)
    reduction_prev = False
    cells = []
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        if reduction:
            c_curr *= 2
        cells.append((reduction, reduction_prev, c_pp, c_p, c_curr, hw_pp, hw_p))
        hw_out = (out_size(hw_p[0], 3, 2, 1), out_size(hw_p[1], 3, 2, 1)) if reduction else hw_p
        reduction_prev = reduction
        c_pp, c_p = c_p, multiplier * c_curr
        hw_pp, hw_p = hw_p, hw_out
    return cells, c_p, hw_p


def _darts_fixed(C, layers, num_classes, input_shape, stem_multiplier, multiplier, auxiliary, affine=True):
    """Cost of everything but the cell ops: stem, preprocessing, classifier (and auxiliary head)."""
    h, w, c_in = input_shape
    total = conv(h, w, c_in, stem_multiplier * C, 3) + bn(stem_multiplier * C, affine)
    cells, c_last, _ = _darts_cells(C, layers, (h, w), stem_multiplier, multiplier)
    for i, (reduction, reduction_prev, c_pp, c_p, c_cell, hw_pp, hw_p) in enumerate(cells):
        if reduction_prev:
            total = total + factorized_reduce(c_pp, c_cell, *hw_pp, affine)
        else:
            total = total + _relu_conv_bn(c_pp, c_cell, *hw_p, affine)
        total = total + _relu_conv_bn(c_p, c_cell, *hw_p, affine)
        if auxiliary and i == 2 * layers // 3:
            c_aux = multiplier * c_cell
            hw_aux = (out_size(hw_p[0], 3, 2, 1), out_size(hw_p[1], 3, 2, 1)) if reduction else hw_p
            ha, wa = out_size(hw_aux[0], 5, 3, 0), out_size(hw_aux[1], 5, 3, 0)
            hb, wb = out_size(ha, 2, 1, 0), out_size(wa, 2, 1, 0)
            total = (total + conv(ha, wa, c_aux, 128) + bn(128) + conv(hb, wb, 128, 768, 2) + bn(768)
                     + linear(768 * hb * wb, num_classes))
    return total + linear(c_last, num_classes)


def _edge_inputs(steps: int) -> list[int]:
    """Input index of each edge of a DARTS cell, in the reference alpha order."""
    return [j for i in range(steps) for j in range(i + 2)]


def darts_network_cost(genotype: Any, C: int = 36, layers: int = 20, num_classes: int = 10,
                       input_shape: Sequence[int] = (32, 32, 3), *, auxiliary: bool = False,
                       stem_multiplier: int = 3) -> Cost:
    """FLOPs and parameters of the DARTS evaluation network of ``genotype`` (``NetworkCIFAR``).

    Args:
      genotype: with ``normal``, ``reduce`` (lists of ``(op, input)`` pairs, two per node) and
        ``normal_concat``, ``reduce_concat`` (the reference ``Genotype`` namedtuple or alike).
      C, layers, num_classes: network configuration (paper: 36, 20, 10).
      input_shape: ``(H, W, C_in)``.
      auxiliary: include the auxiliary head (the papers' parameter counts exclude it; it only
        runs in training).
      stem_multiplier: stem width ``stem_multiplier * C``.

    Returns:
      :class:`Cost` per example. DARTS_V2 with the paper's configuration: 3,349,342 parameters.
    """
    h, w, _ = input_shape
    concat = {False: list(genotype.normal_concat), True: list(genotype.reduce_concat)}
    if len(concat[False]) != len(concat[True]):
        raise ValueError("`genotype`: normal and reduce cells must concatenate the same number of nodes")
    multiplier = len(concat[False])
    total = _darts_fixed(C, layers, num_classes, (h, w, input_shape[2]), stem_multiplier, multiplier, auxiliary)
    cells, _, _ = _darts_cells(C, layers, (h, w), stem_multiplier, multiplier)
    for reduction, _rp, _cpp, _cp, c_cell, _hwpp, hw_p in cells:
        ops = genotype.reduce if reduction else genotype.normal
        for op, j in ops:
            stride = 2 if reduction and j < 2 else 1
            hw_in = hw_p if j < 2 or not reduction else (out_size(hw_p[0], 3, 2, 1), out_size(hw_p[1], 3, 2, 1))
            total = total + darts_op(op, c_cell, hw_in[0], hw_in[1], stride)
    return total


def darts_cost_table(C: int = 36, layers: int = 20, num_classes: int = 10,
                     input_shape: Sequence[int] = (32, 32, 3), *, steps: int = 4, multiplier: int = 4,
                     stem_multiplier: int = 3, primitives: Sequence[str] = DARTS_PRIMITIVES,
                     auxiliary: bool = False, metric: str = "flops") -> tuple[dict, int]:
    """Per-edge candidate costs of the DARTS cell, summed over the network's normal (resp.
    reduction) cells: ``({"normal": (E, K), "reduce": (E, K)}, constant)``, ``E`` edges in the
    reference alpha order, ``K = len(primitives)``."""
    h, w, c_in = input_shape
    inputs = _edge_inputs(steps)
    tables = {"normal": np.zeros((len(inputs), len(primitives))), "reduce": np.zeros((len(inputs), len(primitives)))}
    cells, _, _ = _darts_cells(C, layers, (h, w), stem_multiplier, multiplier)
    for reduction, _rp, _cpp, _cp, c_cell, _hwpp, hw_p in cells:
        t = tables["reduce" if reduction else "normal"]
        for e, j in enumerate(inputs):
            stride = 2 if reduction and j < 2 else 1
            hw_in = hw_p if j < 2 or not reduction else (out_size(hw_p[0], 3, 2, 1), out_size(hw_p[1], 3, 2, 1))
            for k, op in enumerate(primitives):
                t[e, k] += darts_op(op, c_cell, hw_in[0], hw_in[1], stride).get(metric)
    const = _darts_fixed(C, layers, num_classes, (h, w, c_in), stem_multiplier, multiplier, auxiliary).get(metric)
    return tables, const


# ---------------------------------------------------------------------------------------------
# NAS-Bench-201
# ---------------------------------------------------------------------------------------------
NB201_CONV = {"nor_conv_1x1": 1, "nor_conv_3x3": 3, "nor_conv_7x7": 7}


def nb201_op(op: str, c: int, h: int, w: int) -> Cost:
    """A NB201 cell op (``ReLUConvBN`` for ``nor_conv_kxk``, affine BN, no conv bias; parameter-free
    otherwise)."""
    if op in NB201_CONV:
        k = NB201_CONV[op]
        return conv(h, w, c, c, k) + bn(c)
    if op in ("none", "skip_connect", "avg_pool_3x3", "max_pool_3x3"):
        return Cost()
    raise ValueError(f"unknown NB201 op {op!r}")


def _nb201_stages(C: int, input_hw: tuple[int, int]):
    """(channels, (h, w)) of the three stages."""
    h, w = input_hw
    out = [(C, (h, w))]
    for _ in range(2):
        c, (h, w) = out[-1]
        out.append((2 * c, (out_size(h, 3, 2, 1), out_size(w, 3, 2, 1))))
    return out


def _nb201_fixed(C: int, num_classes: int, input_shape: Sequence[int]) -> Cost:
    h, w, c_in = input_shape
    total = conv(h, w, c_in, C, 3) + bn(C)
    stages = _nb201_stages(C, (h, w))
    for (c_prev, _), (c, (ho, wo)) in zip(stages[:-1], stages[1:]):
        total = (total + conv(ho, wo, c_prev, c, 3) + bn(c) + conv(ho, wo, c, c, 3) + bn(c)
                 + conv(ho, wo, c_prev, c, 1))
    c_last = stages[-1][0]
    return total + bn(c_last) + linear(c_last, num_classes)


def nb201_network_cost(structure: Sequence[Sequence[tuple[str, int]]], C: int = 16, N: int = 5,
                       num_classes: int = 10, input_shape: Sequence[int] = (32, 32, 3)) -> Cost:
    """FLOPs and parameters of the NB201 ``TinyNetwork`` with cells of ``structure`` (nodes of
    ``(op, input)`` pairs, e.g. from ``diffnas_jax.spaces.nb201.parse_structure``)."""
    h, w, _ = input_shape
    total = _nb201_fixed(C, num_classes, input_shape)
    for c, (hs, ws) in _nb201_stages(C, (h, w)):
        for node in structure:
            for op, _ in node:
                total = total + N * nb201_op(op, c, hs, ws)
    return total


def nb201_cost_table(op_names: Sequence[str], num_edges: int, C: int = 16, N: int = 5, num_classes: int = 10,
                     input_shape: Sequence[int] = (32, 32, 3), metric: str = "flops") -> tuple[dict, int]:
    """``({"cell": (num_edges, len(op_names))}, constant)``: each op's cost on one edge of every
    cell of the network (the three stages, ``N`` cells each)."""
    h, w, _ = input_shape
    row = np.zeros(len(op_names))
    for c, (hs, ws) in _nb201_stages(C, (h, w)):
        row += N * np.array([nb201_op(op, c, hs, ws).get(metric) for op in op_names], np.float64)
    return {"cell": np.tile(row, (num_edges, 1))}, _nb201_fixed(C, num_classes, input_shape).get(metric)
