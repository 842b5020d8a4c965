"""DARTS-format genotypes: the ``Genotype`` namedtuple, published cells, text parsing/printing.

A genotype lists, for each intermediate node of a normal and a reduction cell, two
``(op_name, input_index)`` pairs; inputs 0 and 1 are the two previous cells' outputs, input
``k >= 2`` is intermediate node ``k - 2``; ``*_concat`` names the states concatenated as the cell
output.  This is the format of the DARTS reference code (Liu et al., ICLR 2019,
github quark0/darts ``cnn/genotypes.py``), which PC-DARTS, P-DARTS and GDAS reuse.
"""
from __future__ import annotations

import ast
from collections import namedtuple
from typing import Any, Iterable, Sequence

__all__ = [
    "Genotype", "PRIMITIVES", "EVAL_OPS", "NASNet", "AmoebaNet", "DARTS_V1", "DARTS_V2", "DARTS",
    "PC_DARTS", "PDARTS", "GDAS", "GENOTYPES", "parse_genotype", "format_genotype",
    "validate_genotype", "get_genotype", "is_cell_pair", "genotype_text", "space_of_genotype_text",
]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

# The DARTS search space's candidate operations, in the reference order (index = mix column).
PRIMITIVES: tuple[str, ...] = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)

# Operations an evaluation cell may use (the reference ``OPS`` table).
EVAL_OPS: tuple[str, ...] = PRIMITIVES + ("sep_conv_7x7", "conv_7x1_1x7")

# Zoph et al., "Learning Transferable Architectures for Scalable Image Recognition" (CVPR 2018),
# as transcribed in the DARTS code.
NASNet = Genotype(
    normal=[("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 0), ("sep_conv_3x3", 0),
            ("avg_pool_3x3", 1), ("skip_connect", 0), ("avg_pool_3x3", 0), ("avg_pool_3x3", 0),
            ("sep_conv_3x3", 1), ("skip_connect", 1)],
    normal_concat=[2, 3, 4, 5, 6],
    reduce=[("sep_conv_5x5", 1), ("sep_conv_7x7", 0), ("max_pool_3x3", 1), ("sep_conv_7x7", 0),
            ("avg_pool_3x3", 1), ("sep_conv_5x5", 0), ("skip_connect", 3), ("avg_pool_3x3", 2),
            ("sep_conv_3x3", 2), ("max_pool_3x3", 1)],
    reduce_concat=[4, 5, 6],
)

# Real et al., "Regularized Evolution for Image Classifier Architecture Search" (AAAI 2019).
AmoebaNet = Genotype(
    normal=[("avg_pool_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("avg_pool_3x3", 3), ("sep_conv_3x3", 1), ("skip_connect", 1),
            ("skip_connect", 0), ("avg_pool_3x3", 1)],
    normal_concat=[4, 5, 6],
    reduce=[("avg_pool_3x3", 0), ("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("sep_conv_7x7", 2),
            ("sep_conv_7x7", 0), ("avg_pool_3x3", 1), ("max_pool_3x3", 0), ("max_pool_3x3", 1),
            ("conv_7x1_1x7", 0), ("sep_conv_3x3", 5)],
    reduce_concat=[3, 4, 6],
)

# Liu et al., "DARTS: Differentiable Architecture Search" (ICLR 2019): first order (V1) and
# second order (V2, the paper's 2.76 % cell).
DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=[2, 3, 4, 5],
)
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5],
)
DARTS = DARTS_V2

# Xu et al., "PC-DARTS: Partial Channel Connections for Memory-Efficient Architecture Search"
# (ICLR 2020), the CIFAR-10 cell of the authors' genotypes.py.
PC_DARTS = Genotype(
    normal=[("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
    normal_concat=range(2, 6),
    reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
    reduce_concat=range(2, 6),
)

# Chen et al., "Progressive Differentiable Architecture Search" (ICCV 2019), CIFAR-10 cell.
PDARTS = Genotype(
    normal=[("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
    normal_concat=range(2, 6),
    reduce=[("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
            ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
    reduce_concat=range(2, 6),
)

# Dong & Yang, "Searching for A Robust Neural Architecture in Four GPU Hours" (CVPR 2019),
# GDAS_V1 of the authors' code (D-X-Y/NAS-Projects).
GDAS = Genotype(
    normal=[("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 3), ("skip_connect", 0), ("sep_conv_5x5", 4), ("sep_conv_3x3", 3)],
    normal_concat=range(2, 6),
    reduce=[("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("sep_conv_5x5", 2), ("sep_conv_5x5", 1),
            ("dil_conv_5x5", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 1)],
    reduce_concat=range(2, 6),
)

GENOTYPES: dict[str, Genotype] = {
    "NASNet": NASNet, "AmoebaNet": AmoebaNet, "DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2,
    "DARTS": DARTS_V2, "PC_DARTS": PC_DARTS, "PDARTS": PDARTS, "GDAS": GDAS,
}


def get_genotype(name_or_genotype: str | Genotype) -> Genotype:
    """A built-in genotype by name (``"DARTS_V2"``, ...), a text form, or a ``Genotype`` (checked)."""
    if isinstance(name_or_genotype, str):
        if name_or_genotype in GENOTYPES:
            return GENOTYPES[name_or_genotype]
        if name_or_genotype.lstrip().startswith("Genotype("):
            return parse_genotype(name_or_genotype)
        raise ValueError(f"unknown genotype name {name_or_genotype!r}; expected one of {sorted(GENOTYPES)} "
                         "or a text form 'Genotype(normal=[...], ...)'")
    if isinstance(name_or_genotype, tuple) and len(name_or_genotype) == 4:
        g = Genotype(*name_or_genotype)
        validate_genotype(g)
        return g
    raise TypeError(f"`genotype` must be a Genotype, a name or a text form, got {type(name_or_genotype).__name__}")


def validate_genotype(genotype: Genotype, ops: Iterable[str] = EVAL_OPS) -> None:
    """Raise ``ValueError`` naming the cell and position of the first malformed entry.

    Checks: an even number of ``(op, index)`` pairs per cell, known op names, ``0 <= index < 2 +
    node`` (an input index must point at an earlier state), concat indices within the states.
    """
    ops = tuple(ops)
    for cell in ("normal", "reduce"):
        pairs = list(getattr(genotype, cell))
        concat = list(getattr(genotype, cell + "_concat"))
        if len(pairs) == 0 or len(pairs) % 2:
            raise ValueError(f"genotype.{cell} must hold 2 (op, input) pairs per node, got {len(pairs)} pairs")
        steps = len(pairs) // 2
        for pos, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"genotype.{cell}[{pos}] must be an (op_name, input_index) pair, got {pair!r}")
            name, idx = pair
            if name not in ops:
                raise ValueError(f"genotype.{cell}[{pos}]: unknown op name {name!r}; expected one of {ops}")
            node = pos // 2
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < node + 2:
                raise ValueError(f"genotype.{cell}[{pos}]: input index {idx!r} of node {node} (state {node + 2}) "
                                 f"must be in [0, {node + 1}] (an earlier state)")
        if not concat:
            raise ValueError(f"genotype.{cell}_concat is empty")
        for c in concat:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < steps + 2:
                raise ValueError(f"genotype.{cell}_concat entry {c!r} is not a state index in [0, {steps + 1}]")


def _literal(node: ast.AST, what: str) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        if node.keywords or not 1 <= len(node.args) <= 3:
            raise ValueError(f"{what}: unsupported range(...) form")
        return range(*[_literal(a, what) for a in node.args])
    try:
        return ast.literal_eval(node)
    except ValueError as e:
        raise ValueError(f"{what}: not a literal ({ast.dump(node)[:80]})") from e


def parse_genotype(text: str) -> Genotype:
    """Parse the reference text form ``Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=
    range(2, 6), reduce=[...], reduce_concat=[2, 3, 4, 5])`` without evaluating code.

    Only literals and ``range(...)`` are accepted; the result is validated with
    :func:`validate_genotype`.  Pairs become tuples; ``range`` concat stays a ``range``.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"`text` is not a Genotype(...) expression: {e.msg}") from e
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"):
        raise ValueError("`text` must be of the form Genotype(normal=[...], normal_concat=..., reduce=[...], "
                         "reduce_concat=...)")
    fields = list(Genotype._fields)
    values: dict[str, Any] = {}
    for name, arg in zip(fields, tree.args):
        values[name] = _literal(arg, f"Genotype field {name!r}")
    for kw in tree.keywords:
        if kw.arg not in fields or kw.arg in values:
            raise ValueError(f"Genotype: unexpected or repeated field {kw.arg!r}")
        values[kw.arg] = _literal(kw.value, f"Genotype field {kw.arg!r}")
    if set(values) != set(fields):
        raise ValueError(f"Genotype: missing field(s) {sorted(set(fields) - set(values))}")
    g = Genotype(
        normal=[tuple(p) if isinstance(p, (list, tuple)) else p for p in values["normal"]],
        normal_concat=values["normal_concat"],
        reduce=[tuple(p) if isinstance(p, (list, tuple)) else p for p in values["reduce"]],
        reduce_concat=values["reduce_concat"],
    )
    validate_genotype(g)
    return g


def format_genotype(genotype: Genotype) -> str:
    """The reference text form (``repr`` of the reference namedtuple); inverse of :func:`parse_genotype`."""
    def concat(c: Sequence[int]) -> str:
        return repr(c) if isinstance(c, range) else repr([int(v) for v in c])

    def pairs(p) -> str:
        return repr([(str(o), int(i)) for o, i in p])

    return (f"Genotype(normal={pairs(genotype.normal)}, normal_concat={concat(genotype.normal_concat)}, "
            f"reduce={pairs(genotype.reduce)}, reduce_concat={concat(genotype.reduce_concat)})")


def is_cell_pair(genotype: Any) -> bool:
    """Whether ``genotype`` is a DARTS-style pair of cells (``normal`` / ``reduce`` and their
    concats): this module's :data:`Genotype` or a look-alike such as the PyTorch reference's own."""
    return all(hasattr(genotype, a) for a in ("normal", "normal_concat", "reduce", "reduce_concat"))


def genotype_text(genotype: Any) -> str:
    """The text form in which results store a genotype of any built-in space: a cell pair
    through :func:`format_genotype`, anything else (an NB201 arch string, a layer list, a user
    space's dict) through ``str``."""
    return format_genotype(genotype) if is_cell_pair(genotype) else str(genotype)


def space_of_genotype_text(text: str) -> str:
    """The registered space whose genotype text ``text`` looks like: ``"nb201"`` for an arch
    string (``|op~0|+|...|``), else ``"darts"`` (a ``Genotype(...)`` text or a named genotype such
    as ``"DARTS_V2"``). Used where a user gives a genotype without naming its space."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    g = text.strip()
    return "nb201" if g.startswith("|") and "~" in g else "darts"
