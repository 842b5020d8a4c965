"""Fast differentiable sorting and ranking (Blondel, Teboul, Berthet & Djolonga, ICML 2020).

Soft sorting and ranking are projections onto the permutahedron: ``soft_rank(x)`` projects
``x / eps`` onto the convex hull of the permutations of ``rho = (n, ..., 1)`` and ``soft_sort(x)``
projects ``rho / eps`` onto the permutahedron of ``x`` (with a quadratic, "l2", or entropic,
"kl", regularisation).  After one sort, both reduce to isotonic regression, solved exactly by
pool-adjacent-violators (PAV); the Jacobian of isotonic regression is block-wise averaging over
the solution's blocks (a block-wise softmax for "kl"), so the custom VJPs below never
differentiate through the solver loop.

The outputs and vector-Jacobian products equal the authors' numpy implementation
(``google-research/fast-soft-sort``), with one deliberate exception: for ``soft_sort`` with
``regularization="kl"`` the reference VJP weights each block by ``softmax(rho / eps)`` instead of
``softmax(sorted values)``, which is not the derivative of its own output.  We return the true
gradient (as torchsort does); ``kl_vjp="reference"`` reproduces the authors' numbers.

How it is made fast under XLA on CPU (see BUILD_NOTES.md for numbers):

* XLA's CPU sort is several times faster for a single integer operand than for a float key with
  an index payload, so the argsort packs an order-preserving integer image of each value and its
  index into one int64 and sorts that.  For float32 (and narrower) inputs this is exact; for
  float64 the lowest ``ceil(log2 n)`` mantissa bits give way to the index, so values closer than
  about ``2**-(52 - log2 n)`` relative are ordered by index — a change of the same size in the
  output, since the projection is 1-Lipschitz.
* On CPU, PAV is the textbook sequential stack algorithm in one ``lax.while_loop`` over the
  flattened batch (at most 2 batch n cheap steps), shaped so that XLA updates its stack in place
  (see ``_stack_pav``); XLA:CPU compiles that loop into a single kernel because a step touches
  under 1 kB.  The sorted kl problems of soft_sort / soft_rank with 128 rows or more run the rows
  side by side instead (``_lane_stack_pav``: about n to 2n vector steps, same blocks bit for
  bit).  Where the optional C++ kernel is built (``_pav_cpu.cc`` via ``_pav_ffi``; an XLA FFI
  call), the CPU runs the same stack PAV in it instead, same blocks, 1.4-1.9x faster end to end
  (``DIFFNAS_PAV=xla`` forces the pure-XLA loop, the reference).  Elsewhere it runs as parallel
  rounds: every maximal run of adjacent violating blocks is pooled at once (any order of
  pooling gives the same solution), with segment sums over the block ids; 1-130 rounds, each
  a handful of vectorised O(batch n) operations.
  Both decide on the same differences relative to each block's first element.  The solver
  returns per element its block's first index, size and statistics (the stack PAV gathers
  them from its stack; the parallel rounds compute them with segment sums), so the outputs
  and VJPs, shared by both, need no scan over the blocks: one gather per statistic in the
  forward, one segment sum in the VJP.  soft_sort / soft_rank "kl" sort their rows first, so
  their stack PAV keeps block sums of ``exp(y - y_first) <= 1`` in the linear domain (two exps
  a step instead of two logaddexps).
* One argsort per call; soft_rank inverts the permutation once (a scatter), after which every
  move back to the input's order is a gather.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from diffnas_jax._checks import as_float_array, check_axis, check_choice, check_positive
from diffnas_jax.relax import _pav_ffi

__all__ = ["soft_sort", "soft_rank", "isotonic_l2", "isotonic_kl"]

_DIRECTIONS = ("ASCENDING", "DESCENDING")
_REGULARIZATIONS = ("l2", "kl")
_KL_VJPS = ("exact", "reference")


# ----------------------------------------------------------------------------------------------
# Layout helpers: every core routine works on a (batch, n) array.


def _compute_dtype(dtype) -> Any:
    # bfloat16/float16 lose too much in the segment sums; float64 stays float64.
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _to_2d(x: jax.Array, axis: int):
    x = jnp.moveaxis(x, axis, -1)
    lead = x.shape[:-1]
    return x.reshape((math.prod(lead), x.shape[-1])), lead


def _from_2d(y: jax.Array, lead, axis: int, ndim: int) -> jax.Array:
    y = y.reshape(lead + (y.shape[-1],))
    return jnp.moveaxis(y, -1, axis if axis >= 0 else ndim + axis)


# ----------------------------------------------------------------------------------------------
# Argsort through one integer sort.


def _argsort_descending(z: jax.Array) -> jax.Array:
    """Indices that sort each row of ``z`` (batch, n) in descending order."""
    n = z.shape[-1]
    with jax.enable_x64(True):  # int64 keys are needed even when the caller runs in 32-bit mode
        if z.dtype == jnp.float64:
            bits = lax.bitcast_convert_type(-z, jnp.int64)
            key = bits ^ ((bits >> 63) & jnp.int64(0x7FFFFFFFFFFFFFFF))
            shift = max(1, (n - 1).bit_length())
            key = (key >> shift) << shift
        else:
            bits = lax.bitcast_convert_type(-z.astype(jnp.float32), jnp.int32)
            key = (bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))).astype(jnp.int64) << 32
        # Ties go in decreasing index order, as the reference's ``argsort(z)[::-1]`` has them.
        key = key | (n - 1 - lax.broadcasted_iota(jnp.int64, z.shape, 1))
        key = jnp.sort(key, axis=-1)
        mask = (1 << max(1, (n - 1).bit_length())) - 1 if z.dtype == jnp.float64 else 0xFFFFFFFF
        return (n - 1 - (key & jnp.int64(mask))).astype(jnp.int32)


def _take(x: jax.Array, perm: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, perm, axis=-1, mode="promise_in_bounds")


def _untake(x: jax.Array, perm: jax.Array) -> jax.Array:
    """Inverse of ``_take``: ``out[b, perm[b, i]] = x[b, i]``."""
    rows = lax.broadcasted_iota(jnp.int32, perm.shape, 0)
    return jnp.zeros_like(x).at[rows, perm].set(x, unique_indices=True, mode="promise_in_bounds")


# ----------------------------------------------------------------------------------------------
# Blocks: a boolean ``start`` marks the first element of each block of consecutive indices.


class _StartBlocks:
    """Segment ids of the blocks of each row from a boolean ``start`` mask, flattened over the
    batch for segment sums: the parallel rounds' view of the blocks."""

    def __init__(self, start: jax.Array):
        batch, n = start.shape
        ids = jnp.cumsum(start, axis=-1, dtype=jnp.int32) - 1
        self.ids = ids
        self.flat = (ids + lax.broadcasted_iota(jnp.int32, start.shape, 0) * n).reshape(-1)
        self.shape = start.shape
        self.num = batch * n

    def block_sum(self, x: jax.Array) -> jax.Array:
        """Per-block sums in block space (batch, n); blocks past the last one are 0."""
        s = jax.ops.segment_sum(x.reshape(-1), self.flat, self.num, indices_are_sorted=True)
        return s.reshape(self.shape)

    def block_logsumexp(self, x: jax.Array) -> jax.Array:
        m = jax.ops.segment_max(x.reshape(-1), self.flat, self.num, indices_are_sorted=True)
        m = jnp.where(jnp.isfinite(m), m, 0)
        s = jax.ops.segment_sum(jnp.exp(x.reshape(-1) - m[self.flat]), self.flat, self.num,
                                indices_are_sorted=True)
        return (jnp.log(s) + m).reshape(self.shape)


def _block_sum(first: jax.Array, x: jax.Array) -> jax.Array:
    """Sums of ``x`` (batch, n) over the blocks given by each element's block-first index,
    broadcast back to every element."""
    batch, n = x.shape
    flat = (first + lax.broadcasted_iota(jnp.int32, x.shape, 0) * n).reshape(-1)
    s = jax.ops.segment_sum(x.reshape(-1), flat, batch * n, indices_are_sorted=True)
    return s.at[flat].get(mode="promise_in_bounds").reshape(x.shape)


class _Blocks(NamedTuple):
    """The blocks of a PAV solution, per element of a (batch, n) problem.

    The block's first index doubles as its segment id (unique in the row, non-decreasing), so
    no cumulative sum over the block starts is needed after the solver (XLA:CPU lowers one to an
    associative scan: ~0.15 ms at 10^4 elements), and the ids stay row-local under vmap."""

    first: jax.Array  # (batch, n) int32: the index in the row of the block's first element
    size: jax.Array  # (batch, n) float: the number of elements of the block

    def sum(self, x: jax.Array) -> jax.Array:
        """Block sum of ``x`` (batch, n), broadcast back to every element of the block."""
        return _block_sum(self.first, x)

    def mean(self, x: jax.Array) -> jax.Array:
        return self.sum(x) / self.size


_WINDOW = 8  # blocks a block may absorb per round; 8 cut the rounds ~8x on long pooling chains
# The long-range step (kl only) cut l2 rounds too (79 -> 3 at n = 10^4) but cost more per round
# than it saved (l2 soft_sort (16, 1000) 80 -> 147 ms) and ~3 s of compile per core; kl needs
# it (408 -> 1 rounds).  See BUILD_NOTES.md section 3.


def _shift(x: jax.Array, t: int, fill: float) -> jax.Array:
    return jnp.concatenate([x[:, t:], jnp.full((x.shape[0], t), fill, x.dtype)], axis=1)


def _diff(p1, p0, q1, q0, eps, n: int | None = None):
    """``y1 - y0`` for ``y = p / eps - q``, from differences only, so that neither a huge ``p / eps``
    nor a huge ``q`` swallows the other's small part (the loss that made float32 soft ranks of
    values 1e8 wrong by 5).  Clipped so sums of n of them stay finite; equal infinities give 0."""
    d = (p1 - p0) / eps - (q1 - q0)
    n = p1.shape[-1] if n is None else n  # the row length: sums of n of them stay finite
    big = jnp.finfo(d.dtype).max / (64 * max(n, 1))
    return jnp.clip(jnp.where(jnp.isnan(d), 0, d), -big, big)


def _wdiff(w1, w0, linear_w: bool):
    """``w1 - w0`` for the kl solver's second argument; with ``linear_w`` it holds ``exp(w)``
    (positive) and the difference is ``log1p((W1 - W0) / W0)``.  soft_rank's ``w = log(rho)``
    rounds by up to 5e-7 at rho ~ 8000 in float32, more than the gap at which a block boundary of
    a row of 10^4 standard normals is decided (1.4e-7): the float32 gradient pooled a singleton the
    float64 one kept apart (issue 19).  ``rho`` is exact and its differences are exact integers."""
    if linear_w:
        return jnp.log1p((w1 - w0) / w0)
    return _diff(w1, w0, 0.0, 0.0, 1.0)


def _segmented_cumsum(x: jax.Array, head: jax.Array) -> jax.Array:
    """Inclusive sums along axis 1 that restart at every ``head``; a tree of pairwise sums, so
    the rounding grows with log n rather than n."""
    def op(u, v):
        return jnp.where(v[1], v[0], u[0] + v[0]), u[1] | v[1]
    return lax.associative_scan(op, (x, head), axis=1)[0]


def _long_range_last(num, den, own, anchor, log_domain: bool) -> jax.Array:
    """Per anchor block j, the last block K of the run j..K over which the pooled value keeps
    rising strictly (each next block's own value above the pooled value before it), stopping at
    the next anchor or a padded block; ``idx`` elsewhere.  The pooled value of j..k is
    ``sum(num[j..k]) / sum(den[j..k])`` (its log for ``log_domain``), ``own[k]`` block k's own
    value on the same scale, all relative to the block's anchor.

    Why pooling j..K is a valid PAV step: running PAV to completion on the sub-problem j..K
    (its atoms the current blocks) is a sequence of merges of adjacent violators of the whole
    problem, so each block of that solution lies inside one block of the whole solution; its
    first block is j..K', K' the last maximiser of the pooled value, here K' = K.  The test
    compares each block's own value to the pooled one, not pooled values to each other: the
    pooled value rises by amounts below float32 resolution along a long chain (exp terms of
    far blocks underflow), while the block's own value is far above it.  This is what breaks
    pooling chains: a block absorbing its neighbours one window at a time took n / _WINDOW
    rounds (3425 rounds for kl soft_sort at n = 10^4).
    """
    rows, nb = num.shape
    idx = lax.broadcasted_iota(jnp.int32, num.shape, 1)
    # one scan for both sums: every scan unrolls into ~log2(n) levels of ops at compile time
    both = _segmented_cumsum(jnp.concatenate([num, den]), jnp.concatenate([anchor, anchor]))
    cn, cd = both[:rows], both[rows:]
    pooled = jnp.log(cn) - jnp.log(cd) if log_domain else cn / cd
    before = jnp.concatenate([jnp.full_like(pooled[:, :1], jnp.nan), pooled[:, :-1]], axis=1)
    rises = (own > before) & jnp.isfinite(pooled)  # False on NaN (padded blocks, overflow)
    stop = anchor | ~rises
    nxt = lax.cummin(jnp.where(stop, idx, nb), axis=1, reverse=True)  # first stop at or after k
    end = jnp.concatenate([nxt[:, 1:], jnp.full_like(nxt[:, :1], nb)], axis=1) - 1
    return jnp.where(anchor, end, idx)


def _long_range(stats, size, last, log_domain: bool) -> jax.Array:
    """``last`` (per block, the last block it pools with) extended by ``_long_range_last``
    forwards from the row's first block and every pooled block, and backwards (the mirror
    image: the last block of the sub-problem on a segment ending at an anchor) from the row's
    last block and every pooled block, since a pooling chain can grow either way.

    ``stats(seg, backward)`` returns the (num, den, own) terms of ``_long_range_last`` relative
    to block ``seg`` (in the given order); padded blocks (size 0) must give (0, 0, NaN)."""
    batch, nb = size.shape
    idx = lax.broadcasted_iota(jnp.int32, size.shape, 1)
    real = size > 0
    fl = lambda x: x[:, ::-1]  # noqa: E731
    anchor = (idx == 0) | (size > 1)
    # backwards: on the flipped row the anchor's group is anchor..K with K the end of the run
    # over which the suffix value keeps falling, i.e. the negated value keeps rising
    anchor_b = (real & (size > 1)) | (idx == jnp.sum(real, axis=1, keepdims=True) - 1)
    both = jnp.concatenate([anchor, fl(anchor_b)])  # forwards and flipped rows in one batch
    seg = lax.cummax(jnp.where(both, jnp.concatenate([idx, idx]), 0), axis=1)
    fwd, bwd = stats(seg[:batch], False), stats(fl(nb - 1 - seg[batch:]), True)
    end = _long_range_last(*(jnp.concatenate([u, v]) for u, v in zip(fwd, bwd)), both, log_domain)
    last = jnp.maximum(last, end[:batch])
    k = fl(nb - 1 - end[batch:])  # per backward anchor g: the first block K of its group
    rows = lax.broadcasted_iota(jnp.int32, size.shape, 0)
    return last.at[rows, k].max(jnp.where(anchor_b, idx, -1), mode="promise_in_bounds")


def _merge_round_l2(a, b, pf, qf, eps) -> jax.Array:
    """One parallel pooling round for l2 in block space; returns the surviving block starts.

    Per block (batch, nb; padded blocks empty): ``a`` = sum over the block of ``y - y_first``,
    ``b`` = its size, ``pf``/``qf`` = ``p``/``q`` at its first element (``y = p / eps - q``), so
    every comparison is made on differences relative to block j's first element and stays exact
    when ``|y|`` is many orders of magnitude above the gaps that decide the pooling.  Block j
    absorbs blocks j+1..K(j), K(j) the last maximiser of the pooled mean over the window
    j..j+_WINDOW: then no split of j..K(j) has a larger left part, so the group is one block of
    the sub-problem on it and pooling it is a valid PAV step (PAV's result does not depend on the
    order of its merges).  Overlapping groups share a final block, so their union is pooled.
    """
    nb = a.shape[-1]
    idx = lax.broadcasted_iota(jnp.int32, a.shape, 1)
    value = a / b  # relative to the block's first element; NaN for padded blocks: never merged
    if nb == 1:
        return jnp.ones(a.shape, bool)
    acc_a, acc_b, best = a, b, value
    last = idx
    for t in range(1, min(_WINDOW, nb - 1) + 1):
        offset = _diff(_shift(pf, t, 0.0), pf, _shift(qf, t, 0.0), qf, eps)  # y_first(j+t) - y_first(j)
        bt = _shift(b, t, 0.0)
        acc_a = acc_a + _shift(a, t, 0.0) + bt * offset
        acc_b = acc_b + bt
        if t == 1:
            # the plain PAV violation test between neighbours (ties pool, as in the reference)
            merge = value <= offset + _shift(value, 1, jnp.nan)
            best = jnp.where(merge, acc_a / acc_b, best)
            last = jnp.where(merge, idx + 1, idx)
            continue
        cand = acc_a / acc_b
        better = cand >= best
        best = jnp.where(better, cand, best)
        last = jnp.where(better, idx + t, last)
    reach = lax.cummax(last, axis=1)
    return jnp.concatenate([jnp.ones_like(reach[:, :1], dtype=bool), reach[:, :-1] < idx[:, 1:]], 1)


def _merge_round_kl(ya, wa, yf, wf, ey, size, long_range: bool = True, linear_w: bool = False) -> jax.Array:
    """One parallel pooling round for kl in block space; returns the surviving block starts.

    Per block: ``ya`` = logsumexp over the block of ``y - y_first``, ``wa`` the same of ``w``,
    ``yf``/``wf`` the (unscaled) first ``y * ey`` / ``w``; the pooled value is
    ``logsumexp(y_B) - logsumexp(w_B)``.  Every comparison uses differences relative to block j
    (as in ``_merge_round_l2``): a logsumexp of values of 1e8 would round its log|B| away in
    float32 (tied soft ranks came out as 11 of 7); ``linear_w``: ``wf`` is ``exp(w)`` (``_wdiff``).
    The window search is that of
    ``_merge_round_l2``, on ratios of sums of exp(stat_k - stat_j); an overflowing window just
    stops there (a merge missed here is found in a later round).
    """
    nb = ya.shape[-1]
    idx = lax.broadcasted_iota(jnp.int32, ya.shape, 1)
    if nb == 1:
        return jnp.ones(ya.shape, bool)
    acc_a = jnp.ones_like(ya)
    acc_b = jnp.ones_like(wa)
    best = jnp.ones_like(ya)
    last = idx
    for t in range(1, min(_WINDOW, nb - 1) + 1):
        # stat_{j+t} - stat_j for both sides; padded blocks (-inf) give exp(...) = 0 or NaN
        da = _diff(_shift(yf, t, 0.0), yf, 0.0, 0.0, ey) + _shift(ya, t, -jnp.inf) - ya
        db = _wdiff(_shift(wf, t, 0.0), wf, linear_w) + _shift(wa, t, -jnp.inf) - wa
        acc_a = acc_a + jnp.exp(da)
        acc_b = acc_b + jnp.exp(db)
        cand = jnp.where(jnp.isfinite(acc_a) & jnp.isfinite(acc_b), acc_a / acc_b, jnp.nan)
        if t == 1:
            merge = da >= db  # the plain PAV violation test: value_j <= value_{j+1}
            last = jnp.where(merge, idx + 1, idx)
            best = jnp.where(merge, cand, best)
            # a pooled pair whose ratio overflowed ends the window for that block
            best = jnp.where(merge & jnp.isnan(cand), jnp.inf, best)
            continue
        # strict: a far block whose exp terms underflow leaves acc_a / acc_b unchanged, an exact
        # "tie" that is no violation (pooling it was wrong by up to 1.9 in float64); true kl ties
        # still pool through the adjacent test in a later round.
        better = cand > best
        best = jnp.where(better, cand, best)
        last = jnp.where(better, idx + t, last)

    def stats(seg, backward):
        # exp(stat_k - stat_anchor) for both sides; the pooled value is log(sum_a / sum_b)
        da = _diff(yf, _take(yf, seg), 0.0, 0.0, ey) + ya - _take(ya, seg)
        db = _wdiff(wf, _take(wf, seg), linear_w) + wa - _take(wa, seg)
        ea, eb = (jnp.where(size > 0, jnp.exp(d), 0) for d in (da, db))
        own = jnp.where(size > 0, da - db, jnp.nan)
        return (eb[:, ::-1], ea[:, ::-1], -own[:, ::-1]) if backward else (ea, eb, own)

    if long_range:
        last = _long_range(stats, size, last, log_domain=True)
    reach = lax.cummax(last, axis=1)
    return jnp.concatenate([jnp.ones_like(reach[:, :1], dtype=bool), reach[:, :-1] < idx[:, 1:]], 1)


def _first_index(start: jax.Array) -> jax.Array:
    """For each element, the index of the first element of its block."""
    iota = lax.broadcasted_iota(jnp.int32, start.shape, 1)
    return lax.cummax(jnp.where(start, iota, 0), axis=1)


def _relative(start, p, q, eps):
    """(``p``, ``q`` at each element's block start; ``y - y_first`` per element)."""
    first = _first_index(start)
    pf, qf = _take(p, first), _take(q, first)
    return pf, qf, _diff(p, pf, q, qf, eps)


def _pav_l2_parallel(p: jax.Array, q: jax.Array, eps) -> jax.Array:
    """Block starts of ``argmin_{v_1 >= ... >= v_n} 0.5 ||v - y||^2``, ``y = p / eps - q``.

    ``y`` is never formed: every decision uses differences of ``p`` and of ``q`` relative to a
    block's first element (see ``_diff``), so the blocks are those of the exact ``y`` to within
    the rounding of those differences, at any magnitude and any ``eps``.
    """
    p, q = lax.stop_gradient(p), lax.stop_gradient(q)
    eps = lax.stop_gradient(eps)
    iota = lax.broadcasted_iota(jnp.int32, p.shape, 1)

    def body(carry):
        start, _ = carry
        blocks = _StartBlocks(start)
        _, _, rel = _relative(start, p, q, eps)
        pos = blocks.block_sum(jnp.where(start, iota, 0))
        keep = _merge_round_l2(blocks.block_sum(rel), blocks.block_sum(jnp.ones_like(rel)),
                               _take(p, pos), _take(q, pos), eps)
        new = start & jnp.take_along_axis(keep, blocks.ids, axis=1, mode="promise_in_bounds")
        return new, jnp.any(new != start)

    start = _merge_round_l2(jnp.zeros_like(p), jnp.ones_like(p), p, q, eps)  # singletons at first
    start, _ = lax.while_loop(lambda c: c[1], body, (start, jnp.any(~start)))
    return start


def _pav_kl_parallel(py: jax.Array, pw: jax.Array, ey, linear_w: bool = False) -> jax.Array:
    """Block starts of ``argmin_{v_1 >= ... >= v_n} <exp(y - v), 1> + <exp(w), v>``,
    ``y = py / ey`` (block value = logsumexp(y_B) - logsumexp(w_B)), decided on differences
    relative to each block's first element (see ``_merge_round_kl``).
    The loop carries no tangents (inputs are stop_gradient-ed), so it never needs transposing.
    """
    py, pw, ey = lax.stop_gradient(py), lax.stop_gradient(pw), lax.stop_gradient(ey)
    iota = lax.broadcasted_iota(jnp.int32, py.shape, 1)

    def body(carry):
        start, _ = carry
        blocks = _StartBlocks(start)
        first = _first_index(start)
        yrel = _diff(py, _take(py, first), 0.0, 0.0, ey)
        wrel = _wdiff(pw, _take(pw, first), linear_w)
        pos = blocks.block_sum(jnp.where(start, iota, 0))
        keep = _merge_round_kl(blocks.block_logsumexp(yrel), blocks.block_logsumexp(wrel),
                               _take(py, pos), _take(pw, pos), ey, blocks.block_sum(jnp.ones_like(yrel)),
                               linear_w=linear_w)
        new = start & jnp.take_along_axis(keep, blocks.ids, axis=1, mode="promise_in_bounds")
        return new, jnp.any(new != start)

    zeros = jnp.zeros_like(py)
    # every element is its own block at first
    # the long-range step must run here too: skipping it left 1456 rounds at n = 10^4 (why the
    # loop's own long-range step does not catch the chain then is not understood yet)
    start = _merge_round_kl(zeros, zeros, py, pw, ey, jnp.ones_like(py), linear_w=linear_w)
    start, _ = lax.while_loop(lambda c: c[1], body, (start, jnp.any(~start)))
    return start


# ----------------------------------------------------------------------------------------------
# Sequential stack PAV (the CPU path): one pass over the flattened batch, O(batch n) steps.


def _inclusive_count(mask: jax.Array) -> jax.Array:
    """``cumsum(mask)`` of a 1-D boolean array as int32.

    Why not ``jnp.cumsum``: XLA:CPU lowers it to an associative scan of ~log2(n) levels of small
    ops (0.15-0.2 ms at 10^4 elements); a product with a triangular 0/1 matrix per chunk of 32
    (and recursively over the chunk totals) is a few fused dots, 3-4x faster, and exact for
    counts below 2**24 in float32."""
    total = mask.shape[0]
    if total >= 2 ** 24:
        return jnp.cumsum(mask, dtype=jnp.int32)

    # HIGHEST: a GPU's default float32 matmul (TF32, 10-bit mantissa) would round counts > 2048
    dot = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)

    def count(x, m=32):
        k = x.shape[0]
        if k <= m:
            return dot(x, jnp.triu(jnp.ones((k, k), x.dtype)))
        chunks = -(-k // m)
        local = dot(jnp.pad(x, (0, chunks * m - k)).reshape(chunks, m), jnp.triu(jnp.ones((m, m), x.dtype)))
        ends = local[:, -1]
        return (local + (count(ends) - ends)[:, None]).reshape(-1)[:k]

    return count(mask.astype(jnp.float32)).astype(jnp.int32)


def _stack_pav(n_rows: int, n: int, stats0, violates_and_pool):
    """A left-to-right stack PAV over ``n_rows`` rows of length ``n`` laid end to end; blocks
    never pool across a row boundary.  Returns per element (flattened, (batch n,)): the flat
    index of its block's first element, the block's size, and the block's statistics.

    ``stats0`` is the tuple of a new singleton block's statistics (scalars);
    ``violates_and_pool(i, below, bf, top, tf)`` returns (whether the block ``below``, starting at
    ``bf``, and the block ``top``, starting at ``tf`` and ending before ``i``, violate the order,
    the statistics of their union).  Each step evaluates it on one pair: (the top block, the
    next element) in mode B, where a violating element is merged into the top at once and any
    other is pushed; (the block below, the top) in mode A, entered after a merge or a pool when
    there is a block below in the row, where a violation pools the two.  These are the pairs,
    operands and order of the textbook push-then-pool stack, so the blocks and statistics are the
    same bit for bit, in n + (number of mode A tests) steps instead of n + (number of pools):
    a row that pools into one block takes n steps, not 2n (sorted kl solver 1.6-2x faster, l2
    1.05-1.3x).  The next step's mode is carried, so the loop condition only reads flags.

    Why it is shaped this way: XLA:CPU updates a loop-carried array in place only if nothing
    else reads the incoming array in the same iteration (a read that is not an ancestor of the
    write gets the whole array copied per step: O(n^2)).  So the top block lives in carried
    scalars, the stack array is written unconditionally at its free slot ``k + 1`` (a merge or
    pool leaves that slot free anyway), and the block below the top is read back only from the
    *updated* array, into carried scalars that the next step compares.  Slot 0 is a sentinel
    (start -1: no block below).  The final blocks are slots 1..k and the top, in order, so the
    element's slot is the number of block starts up to it: the block statistics the loop kept
    are gathered back instead of recomputed with segment sums.

    Why a step costs ~25 ns: XLA:CPU compiles a while loop whose body and condition access under
    1024 bytes (HLO cost analysis, one iteration; ``xla_cpu_small_while_loop_byte_threshold``)
    into one kernel; above that, each of the body's ~15 fusions runs as a separate task and a
    step costs ~1.5-3 us (two rows interleaved per step, kl: 1.0-1.3 kB, ran 30-50x slower).
    ``test_sequential_pav_loop_is_one_kernel`` checks every step, float32 and float64.
    """
    total = n_rows * n
    stack = tuple(jnp.zeros((total + 1,) + jnp.shape(x), jnp.asarray(x).dtype) for x in stats0)
    starts = jnp.full((total + 1,), -1, jnp.int32)

    def body(c):
        i, k, below, bf, top, tf, mode_a, stack, starts = c
        # the pair under test: mode A (below, top); mode B (top, the singleton element i)
        left = tuple(jnp.where(mode_a, u, t) for u, t in zip(below, top))
        right = tuple(jnp.where(mode_a, t, z) for t, z in zip(top, stats0))
        lf, rf = jnp.where(mode_a, bf, tf), jnp.where(mode_a, tf, i)
        violates, pooled = violates_and_pool(jnp.where(mode_a, i, i + 1), left, jnp.maximum(lf, 0), right, rf)
        violates = violates & (lf >= (rf // n) * n)  # lf = -1 or another row: no pooling
        stack = tuple(a.at[k + 1].set(t) for a, t in zip(stack, top))
        starts = starts.at[k + 1].set(tf)
        push = ~mode_a & ~violates
        k = jnp.where(push, k + 1, jnp.where(mode_a & violates, k - 1, k))
        top = tuple(jnp.where(violates, u, jnp.where(push, z, t)) for u, z, t in zip(pooled, stats0, top))
        tf = jnp.where(violates, lf, jnp.where(push, i, tf))
        i = jnp.where(mode_a, i, i + 1)
        below, bf = tuple(a[k] for a in stack), starts[k]
        # a merged or pooled top may now violate the block below it, if that is in its row
        mode_a = violates & (bf >= (tf // n) * n)
        return i, k, below, bf, top, tf, mode_a, stack, starts

    def cond(c):
        return (c[0] < total) | c[6]

    init = (jnp.int32(1), jnp.int32(0), stats0, jnp.int32(-1), stats0, jnp.int32(0), jnp.bool_(False),
            stack, starts)
    _, k, _, _, top, tf, _, stack, starts = lax.while_loop(cond, body, init)
    num = k + 1  # the top block goes to slot k + 1
    stack = tuple(a.at[num].set(t) for a, t in zip(stack, top))
    slot = lax.iota(jnp.int32, total + 1)
    starts = jnp.where(slot <= num, starts.at[num].set(tf), total)
    mark = jnp.zeros((total,), bool).at[starts[1:]].set(True, mode="drop")
    seg = _inclusive_count(mark)  # the element's slot, 1..num
    starts = jnp.concatenate([starts, jnp.full((1,), total, jnp.int32)])

    def get(a, offset=0):
        return a.at[seg + offset].get(mode="promise_in_bounds")

    first = get(starts)
    return first, get(starts, 1) - first, tuple(get(a) for a in stack)


def _stack_solver(step, init, finish=lambda stats: stats, lane_rule=None):
    """A sequential stack-PAV solver on (batch, n) rows: ``solver(p, q, scale)`` flattens the rows
    end to end (no gradient: the solvers only decide blocks), runs :func:`_stack_pav` with the
    per-block statistics starting at ``init`` (Python numbers) and pooled by ``step(p, q, scale,
    n, dt)`` (the flat rows, ``scale`` one value per flat row; it returns ``violates_and_pool``),
    and returns (first index in the row, size, ``finish(stats)``) per element, (batch, n) each.
    With ``lane_rule(n)`` (the step's rule on values) and at least ``_LANE_MIN_ROWS`` rows, the
    rows run side by side in :func:`_lane_stack_pav` instead (same blocks, bit for bit); the
    choice is made on the static shape at trace time."""

    def solver(p: jax.Array, q: jax.Array, scale):
        batch, n = p.shape
        dt = p.dtype
        if batch * n == 0:
            zero = jnp.zeros(p.shape, dt)
            return jnp.zeros(p.shape, jnp.int32), jnp.ones(p.shape, dt), (zero,) * len(init)
        p, q, scale = (lax.stop_gradient(x) for x in (p, q, scale))
        row_scale = jnp.broadcast_to(scale, (batch, 1)).reshape(-1).astype(dt)
        stats0 = tuple(jnp.full((), v, dt) for v in init)
        if lane_rule is not None and batch >= _LANE_MIN_ROWS:
            first, size, stats = _lane_stack_pav(p, q, row_scale, stats0, lane_rule(n))
            return first, size.astype(dt), tuple(finish(stats))
        first, size, stats = _stack_pav(batch, n, stats0, step(p.reshape(-1), q.reshape(-1), row_scale, n, dt))
        row_base = lax.broadcasted_iota(jnp.int32, (batch, n), 0) * n
        return (first.reshape(batch, n) - row_base, size.reshape(batch, n).astype(dt),
                tuple(a.reshape(batch, n) for a in finish(stats)))

    return solver


def _l2_stack_step(p, q, eps, n, dt):
    """``_pav_l2_parallel``'s decisions on the same differences, per block the sum ``a`` of
    ``y - y_first`` (sizes follow from the block starts)."""

    def violates_and_pool(i, below, bf, top, tf):
        (ba,), (ta,) = below, top
        offset = _diff(p[tf], p[bf], q[tf], q[bf], eps[tf // n], n)  # y_first(top) - y_first(below)
        bb, tb = (tf - bf).astype(dt), (i - tf).astype(dt)
        # the plain PAV test of _merge_round_l2 (ties pool, as in the reference)
        return ba / bb <= offset + ta / tb, (ba + ta + tb * offset,)

    return violates_and_pool


def _logaddexp_finite(a, b):
    """``logaddexp`` of two finite scalars: one exp and one log1p, without ``jnp.logaddexp``'s
    infinity handling (the stack statistics are finite: ``_diff`` clips)."""
    m = jnp.maximum(a, b)
    return m + jnp.log1p(jnp.exp(jnp.minimum(a, b) - m))


def _kl_stack_step(py, pw, ey, n, dt):
    """``_pav_kl_parallel``'s decisions: per block the logsumexps of ``y - y_first`` and
    ``w - w_first``; pooling two blocks is a ``logaddexp`` after shifting the top block's to the
    lower block's first element."""

    def violates_and_pool(i, below, bf, top, tf):
        (ya0, wa0), (ya1, wa1) = below, top
        dy = _diff(py[tf], py[bf], 0.0, 0.0, ey[tf // n], n) + ya1
        dw = _diff(pw[tf], pw[bf], 0.0, 0.0, 1.0, n) + wa1
        # value(below) <= value(top); NaN (inf - inf) never pools, as in _merge_round_kl
        return dy - ya0 >= dw - wa0, (_logaddexp_finite(ya0, dy), _logaddexp_finite(wa0, dw))

    return violates_and_pool


def _kl_sorted_rule(n: int, linear_w: bool = False):
    """The pooling rule of ``_kl_sorted_stack_step`` on values rather than indices:
    ``rule(below, top, py_below, pw_below, py_top, pw_top, ey)`` with every argument a scalar
    (the sequential stack) or one per row (the lane stack, ``_lane_stack_pav``), ``py``/``pw`` at
    each block's first element; returns (whether they violate the order, the pooled sums).
    One definition for both runners, so they decide bit for bit alike.  ``linear_w``: ``pw``
    holds ``exp(w)`` in [1, n] (soft_rank's rho), see ``_wdiff``."""

    def rule(below, top, py0, pw0, py1, pw1, ey):
        (sy0, sw0), (sy1, sw1) = below, top
        dy = _diff(py1, py0, 0.0, 0.0, ey, n)  # <= 0 on sorted rows
        if linear_w:
            # exp(dw) = W1 / W0 in [1/n, 1] never underflows; where exp(dy) does, the test is
            # rightly false (sy0 sw1 W1 / W0 >= 1/n), so no max-shift is needed: 1 exp, 1 divide
            # (a log1p for dw and the max-shift form decided no better: BUILD_NOTES section 3)
            ry, rw = jnp.exp(dy), pw1 / pw0
            return sy0 * sw1 * rw <= ry * (sy1 * sw0), (sy0 + ry * sy1, sw0 + rw * sw1)
        dw = _diff(pw1, pw0, 0.0, 0.0, 1.0, n)
        # exp(dy), exp(dw) as exp(max) times (1, exp(-|dy - dw|)): two exps, and the order test
        # uses the exact ratio of the two even where both underflow
        y_larger, rest = dy >= dw, jnp.exp(-jnp.abs(dy - dw))
        ry, rw = jnp.where(y_larger, 1.0, rest), jnp.where(y_larger, rest, 1.0)
        top_scale = jnp.exp(jnp.maximum(dy, dw))
        pooled = (sy0 + (ry * top_scale) * sy1, sw0 + (rw * top_scale) * sw1)
        return sy0 * sw1 * rw <= ry * (sy1 * sw0), pooled

    return rule


def _kl_sorted_stack_step(py, pw, ey, n, dt, linear_w: bool = False):
    """``_kl_stack_step`` for rows along which ``py`` and ``pw`` do not increase (the sorted
    problems of soft_sort and soft_rank), with block sums in the linear domain:
    ``sum_B exp(y - y_first)`` and the same of ``w``, each in [1, block size] since every term is
    at most 1.  Pooling is then a multiply-add per statistic and no log, and the order test
    ``value(below) <= value(top)`` is ``Sy0 Sw1 exp(dw - dy) <= Sy1 Sw0`` (or its mirror), decided
    correctly also where the exp underflows, since the sums stay in [1, n]: 2 exps a step instead
    of 2 exps and 2 log1ps, the solver 30-40 % faster.  The solver returns the logs of the sums."""
    rule = _kl_sorted_rule(n, linear_w)

    def violates_and_pool(i, below, bf, top, tf):
        return rule(below, top, py[bf], pw[bf], py[tf], pw[tf], ey[tf // n])

    return violates_and_pool


def _lane_stack_pav(p: jax.Array, q: jax.Array, eps: jax.Array, stats0, rule):
    """The stack PAV of ``_stack_pav`` with the rows as lanes: one ``while_loop`` whose step
    advances every row of (batch, n) at once (per row a merge, push or pool of ``_stack_pav``'s
    mode A / mode B, chosen by selects), so it runs max over rows of (n + mode A tests) steps
    instead of the sum over rows.  ``eps`` has one value per row, ``stats0`` is the tuple of a
    singleton block's statistics (scalars) and ``rule`` is a value rule such as
    ``_kl_sorted_rule(n)``.  Returns per element (batch, n): its block's first index in the row,
    the block's size and statistics, bit for bit those of ``_stack_pav`` (same pairs, same order).

    When it pays (BUILD_NOTES section 3, measured): XLA:CPU compiles a while loop that accesses
    fewer than 1024 bytes per iteration (``xla_cpu_small_while_loop_byte_threshold``) into one
    kernel, which is what makes a scalar step of ``_stack_pav`` cost ~25-60 ns.  A step on
    (batch,) vectors cannot fit that budget, so its ~30 fusions run as separate kernels: ~1.5 us
    a step plus ~15-30 ns per row, about the scalar step's cost per row.  Only the sorted kl rule
    gains, from ~128 rows on; the l2 rule does not at 128 rows.

    In place as ``_stack_pav``: each row's stack is written at its free slot ``k + 1`` with one
    scatter per step, and the block below the top is read back only from the updated array."""
    batch, n = p.shape
    dt = p.dtype
    rows = lax.iota(jnp.int32, batch)
    top0 = tuple(jnp.full((batch,), x, dt) for x in stats0)
    stack = tuple(jnp.zeros((batch, n + 1), dt) for _ in stats0)
    starts = jnp.full((batch, n + 1), -1, jnp.int32)  # slot 0: the sentinel, no block below

    def at(a, idx):
        return a.at[rows, idx].get(mode="promise_in_bounds")

    def sel(c, u, v):
        return tuple(jnp.where(c, x, y) for x, y in zip(u, v))

    def body(c):
        i, k, below, bf, pb, qb, top, tf, pt, qt, mode_a, stack, starts, _ = c
        j = jnp.minimum(i, n - 1)
        pi, qi = at(p, j), at(q, j)  # the next element
        active = mode_a | (i < n)  # a finished row neither merges, pushes nor pools
        # the pair under test: mode A (below, top); mode B (top, the singleton element i)
        lf = jnp.where(mode_a, bf, tf)
        (lp, lq), (rp, rq) = sel(mode_a, (pb, qb), (pt, qt)), sel(mode_a, (pt, qt), (pi, qi))
        violates, pooled = rule(sel(mode_a, below, top), sel(mode_a, top, top0), lp, lq, rp, rq, eps)
        violates = violates & (lf >= 0) & active
        stack = tuple(a.at[rows, k + 1].set(t, mode="promise_in_bounds", unique_indices=True)
                      for a, t in zip(stack, top))
        starts = starts.at[rows, k + 1].set(tf, mode="promise_in_bounds", unique_indices=True)
        push = ~mode_a & ~violates & active
        k = jnp.where(push, k + 1, jnp.where(mode_a & violates, k - 1, k))
        top = sel(violates, pooled, sel(push, top0, top))
        tf = jnp.where(violates, lf, jnp.where(push, i, tf))
        pt, qt = sel(violates, (lp, lq), sel(push, (pi, qi), (pt, qt)))
        i = jnp.where(~mode_a & active, i + 1, i)
        below, bf = tuple(at(a, k) for a in stack), at(starts, k)
        b = jnp.maximum(bf, 0)
        pb, qb = at(p, b), at(q, b)
        mode_a = violates & (bf >= 0)
        return i, k, below, bf, pb, qb, top, tf, pt, qt, mode_a, stack, starts, jnp.any(mode_a | (i < n))

    ones, zeros = jnp.ones((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32)
    pt, qt = p[:, 0], q[:, 0]
    init = (ones, zeros, top0, -ones, pt, qt, top0, zeros, pt, qt, jnp.zeros((batch,), bool), stack, starts,
            jnp.asarray(n > 1))
    _, k, _, _, _, _, top, tf, _, _, _, stack, starts, _ = lax.while_loop(lambda c: c[-1], body, init)
    num = k + 1  # per row, the top block goes to slot k + 1: the blocks are slots 1..num
    stack = tuple(a.at[rows, num].set(t) for a, t in zip(stack, top))
    starts = starts.at[rows, num].set(tf)
    slot = lax.broadcasted_iota(jnp.int32, starts.shape, 1)
    used = slot <= num[:, None]
    flat = jnp.where(used & (slot > 0), starts + rows[:, None] * n, batch * n)
    mark = jnp.zeros((batch * n,), bool).at[flat.reshape(-1)].set(True, mode="drop")
    count = _inclusive_count(mark).reshape(batch, n)
    seg = count - count[:, :1] + 1  # the element's slot in its row, 1..num
    starts = jnp.concatenate([jnp.where(used, starts, n), jnp.full((batch, 1), n, jnp.int32)], axis=1)

    def get(a, offset=0):
        return jnp.take_along_axis(a, seg + offset, axis=1, mode="promise_in_bounds")

    first = get(starts)
    return first, get(starts, 1) - first, tuple(get(a) for a in stack)


# Rows from which the lane stack runs instead of the sequential one (where a solver has a lane
# rule), measured for the sorted kl rule against the merging sequential stack (BUILD_NOTES
# section 3): soft_rank's problem gains from 64 rows (1.1x; 1.35x at 128), soft_sort's, which
# pools more (its mode A tests cost the lanes a step each), breaks even at 128 and gains from
# ~192 (1.1x) or at short rows (n = 30: 1.2-1.4x).
_LANE_MIN_ROWS = 128


_pav_l2_sequential_2d = _stack_solver(_l2_stack_step, (0.0,))
_pav_kl_sequential_2d = _stack_solver(_kl_stack_step, (0.0, 0.0))


def _log_sums(sums):
    """The sorted kl solvers keep block sums in the linear domain; callers take their logs."""
    return tuple(jnp.log(a) for a in sums)


_pav_kl_sorted_sequential_2d = _stack_solver(_kl_sorted_stack_step, (1.0, 1.0), _log_sums, _kl_sorted_rule)
_pav_kl_rank_sequential_2d = _stack_solver(functools.partial(_kl_sorted_stack_step, linear_w=True), (1.0, 1.0),
                                           _log_sums, functools.partial(_kl_sorted_rule, linear_w=True))


def _fold_vmapped_rows(solver):
    """``solver(p, q, eps)`` on (batch, n) rows, with a vmap rule that folds the vmapped axis
    into the batch.  The default rule would batch the while loop itself: a per-row predicate and
    a select over the whole stack on every step, i.e. a copy per step (jax.vmap of soft_sort at
    (16, 1000) took 87 ms instead of 7 ms, and grows as n^2)."""
    folded = jax.custom_batching.custom_vmap(solver)

    @folded.def_vmap
    def _rule(axis_size, in_batched, p, q, eps):
        p, q, eps = (x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
                     for x, b in zip((p, q, eps), in_batched))
        batch, n = p.shape[1:]
        # eps is a scalar or one per row ((batch, 1)) in each call: one per row of the fold
        e = jnp.broadcast_to(jnp.reshape(eps, (axis_size, -1)), (axis_size, batch)).reshape(-1, 1)
        out = folded(p.reshape(-1, n), q.reshape(-1, n), e)
        # the first indices are row-local, so every output unfolds by a reshape
        out = jax.tree.map(lambda o: o.reshape(axis_size, batch, n), out)
        return out, jax.tree.map(lambda _: True, out)

    def run(p, q, eps):
        # the solvers only decide the blocks; no tangent may reach custom_vmap
        return folded(*(lax.stop_gradient(jnp.asarray(x)) for x in (p, q, eps)))

    return run


_pav_l2_sequential = _fold_vmapped_rows(_pav_l2_sequential_2d)
_pav_kl_sequential = _fold_vmapped_rows(_pav_kl_sequential_2d)
_pav_kl_sorted_sequential = _fold_vmapped_rows(_pav_kl_sorted_sequential_2d)
_pav_kl_rank_sequential = _fold_vmapped_rows(_pav_kl_rank_sequential_2d)

# The same four solvers as the CPU kernel of _pav_ffi (same blocks; a compiled loop instead of
# XLA:CPU's 25-60 ns while-loop step); the pure-XLA ones above stay the reference.
_pav_l2_ffi = _fold_vmapped_rows(_pav_ffi.solver("diffnas_pav_l2", 1))
_pav_kl_ffi = _fold_vmapped_rows(_pav_ffi.solver("diffnas_pav_kl", 2))
_pav_kl_sorted_ffi = _fold_vmapped_rows(_pav_ffi.solver("diffnas_pav_kl_sorted", 2, _log_sums))
_pav_kl_rank_ffi = _fold_vmapped_rows(_pav_ffi.solver("diffnas_pav_kl_rank", 2, _log_sums))


_PAV_METHODS = ("auto", "sequential", "parallel")


def _pav_method(method: str) -> str:
    check_choice("method", method, _PAV_METHODS)
    if method == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "parallel"
    return method


def _parallel_blocks(start: jax.Array, dtype) -> _Blocks:
    first = _first_index(start)
    return _Blocks(first, _block_sum(first, jnp.ones(start.shape, dtype)))


def _pav_l2(p: jax.Array, q: jax.Array, eps, method: str = "auto"):
    """The blocks of the l2 isotonic regression (see ``_pav_l2_parallel``) and per element its
    block's sum ``a`` of ``y - y_first``: (``_Blocks``, (a,)).  "auto": the sequential stack PAV
    when JAX's default backend is the CPU (one cheap step per push or pool), the parallel rounds
    otherwise (a GPU/TPU runs a scalar loop step for step, microseconds each); the sequential
    solver is the C++ kernel where built (``_pav_ffi.enabled()``), else the XLA loop.  Chosen at
    trace time rather than with ``lax.platform_dependent``, which traces both solvers (about a second
    more per compilation in the tests); an array placed on the CPU of a GPU machine gets the
    parallel rounds: slower, same blocks."""
    if _pav_method(method) == "sequential":
        first, size, stats = (_pav_l2_ffi if _pav_ffi.enabled() else _pav_l2_sequential)(p, q, eps)
        return _Blocks(first, size.astype(p.dtype)), stats
    p, q, eps = (lax.stop_gradient(x) for x in (p, q, eps))
    start = _pav_l2_parallel(p, q, eps)
    blocks = _parallel_blocks(start, p.dtype)
    _, _, rel = _relative(start, p, q, eps)
    return blocks, (blocks.sum(rel),)


def _pav_kl(py: jax.Array, pw: jax.Array, ey, method: str = "auto", sorted_rows: bool = False,
            linear_w: bool = False):
    """The blocks of the kl isotonic problem (see ``_pav_kl_parallel``) and per element its
    block's logsumexps of ``y - y_first`` and ``w - w_first``: (``_Blocks``, (ya, wa));
    ``method`` as in ``_pav_l2``.  ``sorted_rows``: ``py`` and ``pw`` are non-increasing along
    each row, so the sequential solver may sum in the linear domain (see
    ``_pav_kl_sorted_sequential_2d``).  ``linear_w`` (sorted rows only): ``pw`` holds ``exp(w)``
    (see ``_wdiff``); the statistics are still those of ``w``."""
    if linear_w and not sorted_rows:
        raise ValueError("linear_w needs sorted_rows")
    if _pav_method(method) == "sequential":
        ffi = _pav_ffi.enabled()
        if linear_w:
            solver = _pav_kl_rank_ffi if ffi else _pav_kl_rank_sequential
        elif sorted_rows:
            solver = _pav_kl_sorted_ffi if ffi else _pav_kl_sorted_sequential
        else:
            solver = _pav_kl_ffi if ffi else _pav_kl_sequential
        first, size, stats = solver(py, pw, ey)
        return _Blocks(first, size.astype(py.dtype)), stats
    py, pw, ey = (lax.stop_gradient(x) for x in (py, pw, ey))
    start = _pav_kl_parallel(py, pw, ey, linear_w)
    blocks = _parallel_blocks(start, py.dtype)
    yrel = _diff(py, _take(py, blocks.first), 0.0, 0.0, ey)
    wrel = _wdiff(pw, _take(pw, blocks.first), linear_w)

    def logsumexp(x):
        m = _StartBlocks(start)
        mx = jax.ops.segment_max(x.reshape(-1), m.flat, m.num, indices_are_sorted=True)[m.flat]
        mx = jnp.where(jnp.isfinite(mx), mx, 0).reshape(x.shape)
        return mx + jnp.log(blocks.sum(jnp.exp(x - mx)))

    return blocks, (logsumexp(yrel), logsumexp(wrel))


def _kl_solve(py, pw, ey, sorted_rows: bool = False, linear_w: bool = False):
    """The kl blocks, per element ``y - y_first``, ``w - w_first`` and the block logsumexps of
    both (the block statistics the solver kept), and the block's first index.  ``linear_w``:
    ``pw`` is ``exp(w)`` (see ``_wdiff``)."""
    blocks, (ya, wa) = _pav_kl(py, pw, ey, sorted_rows=sorted_rows, linear_w=linear_w)
    first = blocks.first
    yrel = _diff(py, _take(py, first), 0.0, 0.0, ey)
    wrel = _wdiff(pw, _take(pw, first), linear_w)
    # The solver's logsumexps went through a chain of pools, each rounding at the scale of the
    # block's spread (0.8% off in a float32 softmax weight at |x| ~ 1e4); one corrective sum
    # with them as the shift is exact to rounding: exp(rel - lse) <= ~1, the block sum ~1.
    ya = ya + jnp.log(blocks.sum(jnp.exp(yrel - ya)))
    wa = wa + jnp.log(blocks.sum(jnp.exp(wrel - wa)))
    return blocks, yrel, wrel, ya, wa, first


def _l2_projection(p, q, eps):
    """``p / eps - iso(p / eps - q)`` (the l2 projection onto a permutahedron, in sorted order),
    with its blocks.  Per block B with first element f: ``(p_i - p_f) / eps + q_f - mean_B(y - y_f)``,
    so a singleton block returns ``q_i`` exactly and no large ``p / eps`` cancels.  Also returns
    ``p_f`` and ``mean_B(y - y_f)`` (from the solver's block sums)."""
    blocks, (a,) = _pav_l2(p, q, eps)
    pf, qf = _take(p, blocks.first), _take(q, blocks.first)
    mean = a / blocks.size
    return blocks, _diff(p, pf, 0.0, 0.0, eps) + qf - mean, pf, mean


# ----------------------------------------------------------------------------------------------
# Isotonic regression (public): decreasing constraints, as in the reference implementation.


def _isotonic_l2_value(s, w):
    c = _row_scale(s, w)  # iso(s - w) = c iso(s / c - w / c), exactly for a power of two c
    s, w = s / c, w / c
    blocks, (a,) = _pav_l2(s, w, 1.0)
    pf, qf = _take(s, blocks.first), _take(w, blocks.first)
    return blocks, ((pf - qf) + a / blocks.size) * c


@jax.custom_vjp
def _isotonic_l2_2d(s, w):
    return _isotonic_l2_value(s, w)[1]


def _isotonic_l2_fwd(s, w):
    blocks, v = _isotonic_l2_value(s, w)
    return v, blocks


def _isotonic_l2_bwd(blocks, g):
    avg = blocks.mean(g)
    return avg, -avg


_isotonic_l2_2d.defvjp(_isotonic_l2_fwd, _isotonic_l2_bwd)
_isotonic_l2_2d = jax.jit(_isotonic_l2_2d)


def _isotonic_kl_value(s, w):
    blocks, yrel, wrel, ya, wa, first = _kl_solve(s, w, 1.0)
    v = (_take(s, first) - _take(w, first)) + (ya - wa)
    return blocks, v, jnp.exp(yrel - ya), jnp.exp(wrel - wa)


@jax.custom_vjp
def _isotonic_kl_2d(s, w):
    return _isotonic_kl_value(s, w)[1]


def _isotonic_kl_fwd(s, w):
    blocks, v, soft_s, soft_w = _isotonic_kl_value(s, w)
    return v, (blocks.first, soft_s, soft_w)


def _isotonic_kl_bwd(res, g):
    first, soft_s, soft_w = res
    total = _block_sum(first, g)
    return soft_s * total, -soft_w * total


_isotonic_kl_2d.defvjp(_isotonic_kl_fwd, _isotonic_kl_bwd)
_isotonic_kl_2d = jax.jit(_isotonic_kl_2d)


def _isotonic(kind: str, s, w, axis: int):
    s = as_float_array("s", s, min_ndim=1)
    axis = check_axis("axis", axis, s.ndim)
    n = s.shape[axis]
    if w is None:
        w = jnp.arange(n, 0, -1, dtype=s.dtype)
        w = jnp.moveaxis(jnp.broadcast_to(w, s.shape[:axis] + s.shape[axis + 1:] + (n,)), -1, axis)
    w = as_float_array("w", w, min_ndim=1)
    if w.shape != s.shape:
        try:
            w = jnp.broadcast_to(w, s.shape)
        except ValueError as e:
            raise ValueError(f"`w` of shape {w.shape} does not broadcast to `s` of shape {s.shape}") from e
    dtype = jnp.result_type(s.dtype, w.dtype)
    if n == 0:
        return jnp.zeros(s.shape, dtype)
    cdt = _compute_dtype(dtype)
    s2, lead = _to_2d(s.astype(cdt), axis)
    w2, _ = _to_2d(w.astype(cdt), axis)
    # a NaN anywhere in a row makes the whole row NaN (it used to come out as plausible numbers)
    nan_rows = jnp.any(jnp.isnan(s2) | jnp.isnan(w2), axis=-1, keepdims=True)
    s2, w2 = jnp.where(nan_rows, 0, s2), jnp.where(nan_rows, 0, w2)
    v = (_isotonic_l2_2d if kind == "l2" else _isotonic_kl_2d)(s2, w2)
    v = jnp.where(nan_rows, jnp.nan, v)
    return _from_2d(v, lead, axis, s.ndim).astype(dtype)


def isotonic_l2(s: jax.Array, w: jax.Array | None = None, *, axis: int = -1) -> jax.Array:
    """Isotonic regression ``argmin_{v_1 >= ... >= v_n} 0.5 ||v - (s - w)||^2`` along ``axis``.

    The dual step of the projection onto the permutahedron (Blondel et al., ICML 2020, Eq. 6),
    solved exactly by pool-adjacent-violators.  The custom VJP averages the cotangent over each
    block of the solution (w.r.t. ``s``; minus that w.r.t. ``w``).

    Args:
      s: (..., n) array.
      w: array broadcastable to ``s``; defaults to ``(n, n-1, ..., 1)``.
      axis: the axis along which the constraints run.
    Returns:
      v: array of the shape of ``s``, non-increasing along ``axis``.
    """
    return _isotonic("l2", s, w, axis)


def isotonic_kl(s: jax.Array, w: jax.Array | None = None, *, axis: int = -1) -> jax.Array:
    """Isotonic optimisation ``argmin_{v_1 >= ... >= v_n} <exp(s - v), 1> + <exp(w), v>``.

    The KL (entropic) counterpart of :func:`isotonic_l2` (Blondel et al., ICML 2020, Eq. 7);
    on a block B of the solution ``v_B = logsumexp(s_B) - logsumexp(w_B)``, so the VJP is a
    block-wise softmax of ``s`` (and minus one of ``w``) times the block's cotangent sum.

    Args:
      s: (..., n) array.
      w: array broadcastable to ``s``; defaults to ``(n, n-1, ..., 1)`` as in the reference.
      axis: the axis along which the constraints run.
    Returns:
      v: array of the shape of ``s``, non-increasing along ``axis``.
    """
    return _isotonic("kl", s, w, axis)


# ----------------------------------------------------------------------------------------------
# Soft rank: project theta = values * sign / eps onto the permutahedron of rho = (n, ..., 1).


def _rho(shape, dtype):
    return jnp.broadcast_to(jnp.arange(shape[-1], 0, -1, dtype=dtype), shape)


def _inverse(perm: jax.Array) -> jax.Array:
    """The inverse permutation of each row: one scatter, after which every move back to the
    input's order is a gather (cheaper than a scatter on XLA:CPU)."""
    return _untake(lax.broadcasted_iota(jnp.int32, perm.shape, 1), perm)


# l2: x = sign * values and eps enter the custom VJP directly; theta = x / eps is never formed,
# so neither a tiny eps nor a huge value rounds the ranks away (see ``_l2_projection``).


def _rank_l2_forward(x, eps):
    perm = _argsort_descending(x)  # the order of x / eps, eps > 0
    s = _take(x, perm)
    blocks, primal, pf, mean = _l2_projection(s, _rho(s.shape, s.dtype), eps)
    return perm, s, blocks, primal, pf, mean


@jax.custom_vjp
def _soft_rank_l2_2d(x, eps):
    perm, _, _, primal, _, _ = _rank_l2_forward(x, eps)
    return _untake(primal, perm)


def _soft_rank_l2_fwd(x, eps):
    perm, s, blocks, primal, pf, _ = _rank_l2_forward(x, eps)
    inv = _inverse(perm)
    return _take(primal, inv), (perm, inv, blocks, _diff(s, pf, 0.0, 0.0, eps), eps)


def _soft_rank_l2_bwd(res, g):
    perm, inv, blocks, rel, eps = res
    gs = _take(g, perm)
    r = gs - blocks.mean(gs)  # d rank / d theta = I - block average (symmetric)
    # d rank / d log eps = -(I - block average) theta; by symmetry and since r sums to 0 on each
    # block, gs . that = -r . (theta - theta_first): no block mean of theta to compute
    return _take(r, inv) / eps, -jnp.sum(r * rel) / eps


_soft_rank_l2_2d.defvjp(_soft_rank_l2_fwd, _soft_rank_l2_bwd)
_soft_rank_l2_2d = jax.jit(_soft_rank_l2_2d)  # one compilation per shape for eager calls


def _row_scale(*arrays):
    """Per row, a power of two ``c`` with ``|x| / c <= 2`` for every finite entry (1 for zero rows).

    The projection commutes with scaling by ``c``, exactly so for a power of two: solving on
    ``x / c`` keeps every within-block difference small (a pooled block of values 1e36 apart
    is legitimate at a moderate strength) while the clipping in ``_diff`` only bounds the gaps
    that separate blocks."""
    a = functools.reduce(jnp.maximum, [jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0), axis=-1, keepdims=True)
                                       for x in arrays])
    _, e = jnp.frexp(lax.stop_gradient(a))
    return jnp.ldexp(jnp.ones_like(a), jnp.maximum(e - 1, -125))


def _sort_l2_forward(z, eps):
    perm = _argsort_descending(z)
    s = _take(z, perm)
    rho = _rho(s.shape, s.dtype)
    c = _row_scale(s)  # P_s(rho / eps) = c P_{s / c}(rho / (eps c))
    blocks, out, _, _ = _l2_projection(rho, s / c, eps * c)
    return perm, blocks, out * c


@jax.custom_vjp
def _soft_sort_l2_2d(z, eps):
    return _sort_l2_forward(z, eps)[2]


def _soft_sort_l2_fwd(z, eps):
    perm, blocks, out = _sort_l2_forward(z, eps)
    return out, (perm, blocks, eps)


def _soft_sort_l2_bwd(res, g):
    perm, blocks, eps = res
    avg = blocks.mean(g)  # d out / d s = block average; d out / d (rho / eps) = I - block average
    # as for the rank: (g - avg) sums to 0 on each block, so only rho_i - rho_f = f - i enters
    rel = _diff((blocks.first - lax.broadcasted_iota(jnp.int32, g.shape, 1)).astype(g.dtype), 0.0, 0.0, 0.0, eps)
    return _untake(avg, perm), -jnp.sum((g - avg) * rel) / eps


_soft_sort_l2_2d.defvjp(_soft_sort_l2_fwd, _soft_sort_l2_bwd)
_soft_sort_l2_2d = jax.jit(_soft_sort_l2_2d)  # one compilation per shape for eager calls


# kl: as for l2, x = sign * values and eps enter the custom VJP; theta = x / eps is used only as
# differences within a block, and logsumexps are taken relative to each block's first element.


def _rank_kl_forward(x, eps):
    perm = _argsort_descending(x)
    s = _take(x, perm)
    rho = _rho(s.shape, s.dtype)
    # rho, not log(rho): see _wdiff
    blocks, yrel, _, ya, _, first = _kl_solve(s, rho, eps, sorted_rows=True, linear_w=True)
    # exp(theta - lse_B theta + lse_B log rho), with sum_B rho = |B| (rho_first - (|B| - 1) / 2)
    # in closed form (rho falls by 1 per element): no block sum of rho, exact to one rounding
    size = blocks.size
    primal = jnp.exp(yrel - ya) * (size * (_take(rho, first) - (size - 1) / 2))
    return perm, s, blocks, primal, yrel, ya


@jax.custom_vjp
def _soft_rank_kl_2d(x, eps):
    perm, _, _, primal, _, _ = _rank_kl_forward(x, eps)
    return _untake(primal, perm)


def _soft_rank_kl_fwd(x, eps):
    perm, s, blocks, primal, yrel, ya = _rank_kl_forward(x, eps)
    inv = _inverse(perm)
    return _take(primal, inv), (perm, inv, blocks.first, primal, jnp.exp(yrel - ya), yrel, eps)


def _soft_rank_kl_bwd(res, g):
    perm, inv, first, primal, soft, yrel, eps = res
    u = primal * _take(g, perm)
    r = u - soft * _block_sum(first, u)  # d rank / d theta: diag(rank) (I - block softmax of theta)
    # r sums to 0 on each block, so sum(r * theta) = sum(r * (theta - theta_first))
    return _take(r, inv) / eps, -jnp.sum(r * yrel) / eps


_soft_rank_kl_2d.defvjp(_soft_rank_kl_fwd, _soft_rank_kl_bwd)
_soft_rank_kl_2d = jax.jit(_soft_rank_kl_2d)  # one compilation per shape for eager calls


def _sort_kl_forward(z, eps):
    perm = _argsort_descending(z)
    s = _take(z, perm)
    rho = _rho(s.shape, s.dtype)
    blocks, yrel, wrel, ya, wa, first = _kl_solve(rho, s, eps, sorted_rows=True)
    out = yrel - ya + _take(s, first) + wa  # rho / eps - lse_B(rho / eps) + lse_B(s)
    return perm, blocks, out, jnp.exp(yrel - ya), jnp.exp(wrel - wa), yrel


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _soft_sort_kl_2d(z, eps, reference_vjp):
    return _sort_kl_forward(z, eps)[2]


def _soft_sort_kl_fwd(z, eps, reference_vjp):
    perm, blocks, out, soft_w, soft_s, wrel = _sort_kl_forward(z, eps)
    return out, (perm, blocks.first, soft_w if reference_vjp else soft_s, soft_w, wrel, eps)


def _soft_sort_kl_bwd(reference_vjp, res, g):
    perm, first, weights_s, weights_w, wrel, eps = res
    total = _block_sum(first, g)
    gw = g - weights_w * total  # d out / d (rho / eps); sums to 0 on each block
    return _untake(weights_s * total, perm), -jnp.sum(gw * wrel) / eps


_soft_sort_kl_2d.defvjp(_soft_sort_kl_fwd, _soft_sort_kl_bwd)
_soft_sort_kl_2d = jax.jit(_soft_sort_kl_2d, static_argnums=(2,))


# ----------------------------------------------------------------------------------------------
# Public API.


def _mask_nan_rows(x):
    """Rows holding a NaN give all-NaN outputs (never a plausible number); they are solved as
    zeros so that the NaN cannot steer the shared while loop or the sort."""
    nan_rows = jnp.any(jnp.isnan(x), axis=-1, keepdims=True)
    return jnp.where(nan_rows, 0, x), nan_rows


def _prepare(values, direction, regularization_strength, regularization, axis):
    values = as_float_array("values", values, min_ndim=1)
    check_choice("direction", direction, _DIRECTIONS)
    check_choice("regularization", regularization, _REGULARIZATIONS)
    check_positive("regularization_strength", regularization_strength)
    axis = check_axis("axis", axis, values.ndim)
    return values, axis


def soft_rank(
    values: jax.Array,
    direction: str = "ASCENDING",
    regularization_strength: float | jax.Array = 1.0,
    regularization: str = "l2",
    *,
    axis: int = -1,
) -> jax.Array:
    """Soft ranks (1-based) along ``axis`` (Blondel et al., "Fast Differentiable Sorting and
    Ranking", ICML 2020).

    ``r(x) = P(sign * x / eps)``, the projection of ``sign * x / eps`` onto the permutahedron of
    ``(n, ..., 1)`` in the geometry of ``regularization``; ``eps -> 0`` gives the hard ranks
    (1 for the smallest value when ``ASCENDING``), ``eps -> inf`` the mean rank ``(n + 1) / 2``
    ("l2").  O(n log n): one sort and pool-adjacent-violators.

    Args:
      values: (..., n) array; any leading batch dimensions.
      direction: "ASCENDING" (the largest value gets rank n) or "DESCENDING".
      regularization_strength: eps > 0; smaller is closer to the hard ranks.
      regularization: "l2" (quadratic) or "kl" (entropic).
      axis: the axis to rank along.
    Returns:
      Array of the shape and dtype of ``values``.
    """
    values, axis = _prepare(values, direction, regularization_strength, regularization, axis)
    n = values.shape[axis]
    if n == 0:
        return values
    dtype = values.dtype
    x, lead = _to_2d(values.astype(_compute_dtype(dtype)), axis)
    x, nan_rows = _mask_nan_rows(x)
    sign = 1.0 if direction == "ASCENDING" else -1.0
    eps = jnp.asarray(regularization_strength, x.dtype)
    if regularization == "l2":
        out = _soft_rank_l2_2d(sign * x, eps)
    else:
        out = _soft_rank_kl_2d(sign * x, eps)
    out = jnp.where(nan_rows, jnp.nan, out)
    return _from_2d(out, lead, axis, values.ndim).astype(dtype)


def soft_sort(
    values: jax.Array,
    direction: str = "ASCENDING",
    regularization_strength: float | jax.Array = 1.0,
    regularization: str = "l2",
    *,
    axis: int = -1,
    kl_vjp: str = "exact",
) -> jax.Array:
    """Soft sort along ``axis`` (Blondel et al., "Fast Differentiable Sorting and Ranking",
    ICML 2020).

    ``s(x) = sign * P_x(rho / eps)``: the projection of ``rho / eps`` (``rho = (n, ..., 1)``)
    onto the permutahedron of ``sign * x``.  ``eps -> 0`` gives ``sort(x)``; for "l2",
    ``eps -> inf`` gives ``mean(x)`` everywhere.  The "kl" variant is the authors' entropic
    version (meant for positive values, as in the paper's experiments).  O(n log n).

    Args:
      values: (..., n) array; any leading batch dimensions.
      direction: "ASCENDING" or "DESCENDING".
      regularization_strength: eps > 0; smaller is closer to the hard sort.
      regularization: "l2" or "kl".
      axis: the axis to sort along.
      kl_vjp: "exact" (default: the derivative of the output) or "reference" (the authors'
        numpy VJP for "kl", which weights blocks by ``softmax(rho / eps)``; only for comparison).
    Returns:
      Array of the shape and dtype of ``values``, sorted along ``axis``.
    """
    values, axis = _prepare(values, direction, regularization_strength, regularization, axis)
    check_choice("kl_vjp", kl_vjp, _KL_VJPS)
    n = values.shape[axis]
    if n == 0:
        return values
    dtype = values.dtype
    x, lead = _to_2d(values.astype(_compute_dtype(dtype)), axis)
    x, nan_rows = _mask_nan_rows(x)
    sign = -1.0 if direction == "ASCENDING" else 1.0
    eps = jnp.asarray(regularization_strength, x.dtype)
    if regularization == "l2":
        out = sign * _soft_sort_l2_2d(sign * x, eps)
    else:
        out = sign * _soft_sort_kl_2d(sign * x, eps, kl_vjp == "reference")
    out = jnp.where(nan_rows, jnp.nan, out)
    return _from_2d(out, lead, axis, values.ndim).astype(dtype)
