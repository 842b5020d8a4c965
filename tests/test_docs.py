"""Every ```python block of README.md and docs/**/*.md runs as written.

Each block runs on its own, in a fresh namespace, as a reader who copies one block would run it.
An HTML comment on the line just above a block's opening fence (invisible when rendered) may say

    <!-- docs-test: small "range(300)" -> "range(3)", "total_steps=300" -> "total_steps=3" -->
        the block runs with these literal replacements, to keep CI fast; each left-hand string
        must occur in the block (so a stale marker fails instead of silently testing nothing);
    <!-- docs-test: skip <reason> -->
        the block is not run (for code that needs a user's data or hardware); the reason is
        required. Use it sparingly.

Blocks fenced as ```bash, ```text etc. are not Python and are not run.
"""
from __future__ import annotations

import pathlib
import re
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|small)\b(.*?)-->\s*$")
_PAIR = re.compile(r'"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"')


class Block(NamedTuple):
    path: pathlib.Path
    line: int
    code: str
    marker: str | None  # None, "skip" or "small"
    arg: str            # the skip reason or the replacement list


def extract_blocks(path: pathlib.Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        above = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mk = _MARKER.search(above)
        blocks.append(Block(path, line, m.group(1), mk.group(1) if mk else None, mk.group(2).strip() if mk else ""))
    return blocks


def small_settings(block: Block) -> str:
    pairs = _PAIR.findall(block.arg)
    if not pairs:
        raise AssertionError(f"{block.path.name}:{block.line}: `docs-test: small` lists no \"old\" -> \"new\" pairs")
    code = block.code
    for old, new in pairs:
        if old not in code:
            raise AssertionError(f"{block.path.name}:{block.line}: `docs-test: small` replaces {old!r}, "
                                 "which the block does not contain (stale marker)")
        code = code.replace(old, new)
    return code


BLOCKS = [b for p in DOC_FILES for b in extract_blocks(p)]


# a reader runs the blocks in JAX's default float32
pytestmark = pytest.mark.usefixtures("float32_module")


def test_readme_has_python_blocks():
    # the README's quickstarts are the point of this test; losing the fences would make it vacuous
    assert sum(b.path.name == "README.md" for b in BLOCKS) >= 3


def test_extraction_and_markers(tmp_path):
    md = tmp_path / "x.md"
    md.write_text('intro\n```bash\nls\n```\n<!-- docs-test: small "range(9)" -> "range(1)" -->\n'
                  '```python\nfor i in range(9): pass\n```\n<!-- docs-test: skip needs data -->\n```python\n1/0\n```\n')
    a, b = extract_blocks(md)
    assert (a.marker, a.line, b.marker, b.arg) == ("small", 6, "skip", "needs data")
    assert small_settings(a) == "for i in range(1): pass\n"
    with pytest.raises(AssertionError, match="stale"):
        small_settings(a._replace(code="pass\n"))


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.path.relative_to(ROOT)}:{b.line}")
def test_block_runs(block, tmp_path, monkeypatch):
    if block.marker == "skip":
        assert block.arg, f"{block.path.name}:{block.line}: `docs-test: skip` needs a reason"
        pytest.skip(block.arg)
    code = small_settings(block) if block.marker == "small" else block.code
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, f"{block.path.name}:{block.line}", "exec"), {"__name__": "__docs_block__"})
