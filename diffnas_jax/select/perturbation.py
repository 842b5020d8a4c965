"""Perturbation-based architecture selection (DARTS-PT).

Wang, Cheng, Chen, Tang & Hsieh, "Rethinking Architecture Selection in Differentiable NAS",
ICLR 2021. The magnitude of an architecture weight does not say how much the supernet relies on
the operation (skip connections get large weights yet contribute little). DARTS-PT measures it:
on a decision (an edge), each candidate is masked in turn and the supernet's validation
accuracy is measured; the candidate whose removal hurts most is selected and the edge is
discretised, the supernet is optionally fine-tuned, and the next edge follows. The topology
(which incoming edges a node keeps) is then chosen the same way, by masking whole edges: where
the space declares its nodes (``space.topology_groups()``, e.g. the DARTS cell), node by node,
pruning the edge whose removal hurts least and fine-tuning after each prune until the node keeps
its number of inputs (the paper's procedure); otherwise every edge is scored once and ranked.

Here all masked variants of one decision are evaluated in ONE ``jax.vmap`` over masks, so a
decision costs one batched forward per validation batch instead of one per candidate.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax._checks import check_choice
from ._tree import ArchLayout, default_relaxation
from diffnas_jax.spaces.base import SearchSpace

PyTree = Any


class PerturbationResult(NamedTuple):
    """Outcome of :func:`perturbation`.

    Attributes:
      genotype: the selected architecture, decoded by ``space.genotype(arch)``.
      arch: logits encoding the decisions (selected candidate strongest on every decision;
        decisions of a leaf ranked by the accuracy drop their removal causes, so a space's
        topology rule keeps the most important inputs); ``"beta"`` leaves are zeroed so edge
        normalisation does not reorder edges.
      op_accuracy: per choice leaf, ``(rows, candidates)`` validation metric with that candidate
        masked, measured when the row was decided.
      edge_accuracy: per choice leaf, ``(rows,)`` metric with the whole decision masked, measured
        after every decision was made (``None`` when ``select_topology=False``).
      base_accuracy: metric of the supernet before any decision.
      order: ``[(leaf index, row, candidate), ...]`` in the order decisions were made; topology
        prunes appear as ``(leaf index, row, None)``.
      weights, state: the supernet after fine-tuning (unchanged without ``finetune``).
    """

    genotype: Any
    arch: PyTree
    op_accuracy: list
    edge_accuracy: list | None
    base_accuracy: float
    order: list
    weights: PyTree
    state: PyTree


def _topology_groups(space: SearchSpace, layout: ArchLayout) -> list:
    """Per choice leaf, the space's ``[(rows, keep), ...]`` node groups, or ``None``."""
    declared = space.topology_groups()
    out = []
    for j, i in enumerate(layout.choice):
        groups = None
        for name, g in declared.items():
            if layout.paths[i] == jax.tree_util.keystr((jax.tree_util.DictKey(name),)):
                groups = [(tuple(int(r) for r in rows), int(keep)) for rows, keep in g]
                for rows, keep in groups:
                    if not 1 <= keep <= len(rows) or max(rows) >= layout.num_rows(j):
                        raise ValueError(f"space.topology_groups(): group {rows} keep {keep} does not fit "
                                         f"arch leaf {layout.paths[i]} with {layout.num_rows(j)} rows")
        out.append(groups)
    return out


def _default_metric(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(jnp.argmax(logits, axis=-1) == y)


def _make_evaluator(space, layout: ArchLayout, train: bool, metric: Callable):
    """``evaluate(weights, state, rows, mix, j, idx (M,), masks (M, K), x, y) -> (M,)``: the metric of
    the supernet with row ``idx[m]`` of choice leaf ``j`` multiplied by ``masks[m]``, for all ``m``
    in one ``vmap``; ``mix`` supplies the passthrough (``"beta"``) leaves."""

    def evaluate(weights, state, rows, mix, j, idx, masks, x, y):
        def one(r, mask):
            new = list(rows)
            new[j] = rows[j].at[r].multiply(mask.astype(rows[j].dtype))
            logits, _ = space.apply(weights, state, layout.rebuild(mix, new), x, train)
            return metric(logits, y)

        return jax.vmap(one)(idx, masks)

    return jax.jit(evaluate, static_argnums=(4,))


def perturbation(space: SearchSpace, weights: PyTree, state: PyTree, arch: PyTree,
                 relaxation: Callable[..., PyTree] | None, batches: Iterable[tuple[jax.Array, jax.Array]], *,
                 key: jax.Array | None = None, step: Any = 0,
                 finetune: Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]] | None = None,
                 edge_order: str = "largest_effect", select_topology: bool = True, train: bool = False,
                 metric: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> PerturbationResult:
    """DARTS-PT perturbation-based selection (Wang et al., ICLR 2021, Alg. 1).

    Args:
      space: any search space (``apply`` and ``genotype``).
      weights, state: the trained supernet.
      arch: the searched architecture logits.
      relaxation: ``relax(arch, key, step) -> mix`` giving the supernet's mixing weights (the
        search's relaxation; ``None`` for the DARTS softmax). Decided rows become one-hot.
      batches: validation batches ``(x, y)`` (a sequence: it is traversed once per evaluation).
      key: PRNG key for the relaxation, the random edge order and ``finetune``.
      step: the step passed to ``relaxation``.
      finetune: optional ``(weights, state, mix, key) -> (weights, state)``, called after each
        decision with the partly discretised mix (the paper fine-tunes a few epochs).
      edge_order: ``"largest_effect"`` (decide first the decision whose most important candidate
        causes the largest drop, re-measured after every decision), ``"random"`` (the paper's
        default) or ``"sequential"``.
      select_topology: also choose the topology by masking whole decisions. If the space has
        ``topology_groups() -> {arch key: [(rows, keep), ...]}``, each group (a node's incoming
        edges) is pruned one edge at a time — the edge whose removal lowers the metric least,
        re-measured after each prune, with ``finetune`` in between — until ``keep`` remain;
        otherwise all decisions are scored once and ranked. Either way the returned logits rank
        the kept inputs first, so the space's topology rule keeps them.
      train: pass ``train=True`` to ``space.apply`` (BatchNorm with batch statistics, as in a
        supernet without running statistics); the state update is discarded.
      metric: ``(logits, y) -> scalar`` summed over batches, higher is better (default: number of
        correct predictions, i.e. accuracy after normalising).

    Returns:
      A :class:`PerturbationResult`.
    """
    check_choice("edge_order", edge_order, ("largest_effect", "random", "sequential"))
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty: DARTS-PT needs validation data")
    key = jax.random.PRNGKey(0) if key is None else key
    relaxation = default_relaxation if relaxation is None else relaxation
    metric = _default_metric if metric is None else metric
    layout = ArchLayout(arch)
    key, k_relax = jax.random.split(key)
    mix = relaxation(arch, k_relax, step)
    base_rows = [jnp.asarray(r) for r in layout.rows(mix)]
    n_leaves = len(base_rows)
    decided = [np.zeros(r.shape[0], bool) for r in base_rows]
    onehot = [np.zeros(r.shape, np.float64) for r in base_rows]
    pruned = [np.zeros(r.shape[0], bool) for r in base_rows]  # whole decisions masked by topology pruning
    total = float(sum(int(np.shape(y)[0]) for _, y in batches))
    evaluate = _make_evaluator(space, layout, train, metric)

    def current_rows():
        return [jnp.where(jnp.asarray(p)[:, None], 0, jnp.where(jnp.asarray(d)[:, None], jnp.asarray(o, r.dtype), r))
                for r, d, o, p in zip(base_rows, decided, onehot, pruned)]

    def score(weights, state, j, idx, masks):
        rows = current_rows()
        acc = 0.0
        for x, y in batches:
            acc = acc + np.asarray(evaluate(weights, state, rows, mix, j, jnp.asarray(idx), jnp.asarray(masks), x, y))
        return np.asarray(acc, np.float64) / total

    def op_scores(weights, state, j, r):
        k = base_rows[j].shape[1]
        masks = np.concatenate([1.0 - np.eye(k), np.ones((1, k))])  # last variant: nothing masked
        s = score(weights, state, j, np.full(k + 1, r), masks)
        return s[:k], s[k]

    op_accuracy = [np.full(r.shape, np.nan) for r in base_rows]
    order = []
    pending = [(j, r) for j in range(n_leaves) for r in range(base_rows[j].shape[0])]
    if edge_order == "random":
        key, k_perm = jax.random.split(key)
        pending = [pending[i] for i in np.asarray(jax.random.permutation(k_perm, len(pending)))]
    base_accuracy = None
    while pending:
        if edge_order == "largest_effect":
            cand = []
            for j, r in pending:
                accs, base = op_scores(weights, state, j, r)
                cand.append((base - accs.min(), j, r, accs, base))
            # ties: the earliest pending decision, so the result is deterministic
            best = max(range(len(cand)), key=lambda i: (cand[i][0], -i))
            _, j, r, accs, base = cand[best]
            pending.pop(best)
        else:
            j, r = pending.pop(0)
            accs, base = op_scores(weights, state, j, r)
        if base_accuracy is None:
            base_accuracy = float(base)
        op = int(np.argmin(accs))  # the candidate whose removal hurts most
        op_accuracy[j][r] = accs
        decided[j][r] = True
        onehot[j][r] = np.eye(accs.shape[0])[op]
        order.append((j, r, op))
        if finetune is not None:
            key, k_ft = jax.random.split(key)
            weights, state = finetune(weights, state, layout.rebuild(mix, current_rows()), k_ft)

    edge_accuracy = None
    strength = [np.full(r.shape[0], 4.0) for r in base_rows]
    if select_topology:
        edge_accuracy = []
        groups = _topology_groups(space, layout)
        for j in range(n_leaves):
            n, k = base_rows[j].shape
            s = score(weights, state, j, np.arange(n), np.zeros((n, k)))
            edge_accuracy.append(s)
            if groups[j] is None:
                # rank-based strengths in [2, 6]: larger when masking the decision hurts more
                ranks = np.argsort(np.argsort(-s, kind="stable"), kind="stable")
                strength[j] = 2.0 + 4.0 * ranks / max(n - 1, 1)
                continue
            for rows_g, keep in groups[j]:
                remaining = list(rows_g)
                while len(remaining) > keep:
                    acc = score(weights, state, j, np.asarray(remaining), np.zeros((len(remaining), k)))
                    drop = remaining.pop(int(np.argmax(acc)))  # its removal hurts least
                    pruned[j][drop] = True
                    order.append((j, drop, None))
                    if finetune is not None:
                        key, k_ft = jax.random.split(key)
                        weights, state = finetune(weights, state, layout.rebuild(mix, current_rows()), k_ft)
                # kept inputs strongest, in the order they were kept; pruned ones weakest
                strength[j][list(rows_g)] = np.where(pruned[j][list(rows_g)], 2.0, 6.0)

    rows_out = []
    for j in range(n_leaves):
        accs = op_accuracy[j]
        drop = np.nanmax(accs, axis=1, keepdims=True) - accs  # 0 for the least important
        span = np.maximum(np.nanmax(drop, axis=1, keepdims=True), 1e-12)
        pref = 0.5 * drop / span
        pref[np.arange(len(pref)), np.argmax(onehot[j], axis=1)] = 1.0
        dtype = base_rows[j].dtype if jnp.issubdtype(base_rows[j].dtype, jnp.floating) else jnp.float32
        rows_out.append(jnp.asarray(strength[j][:, None] * pref, dtype))
    decoded = layout.rebuild(arch, rows_out, passthrough=jnp.zeros_like)
    return PerturbationResult(space.genotype(decoded), decoded, op_accuracy, edge_accuracy,
                              float(base_accuracy), order, weights, state)
