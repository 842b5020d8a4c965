"""Run logging: ``metrics.jsonl`` (always), TensorBoard (only when ``tensorboardX`` is importable).

Every line is strict JSON: a non-finite value is written as ``null`` and its key listed under
``"non_finite"`` in the same record (see :mod:`diffnas_jax._json`).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

from .._json import dumps, to_strict


def to_jsonable(v: Any) -> Any:
    """Nested dicts/lists of arrays and numpy scalars as plain JSON values (non-finite -> ``None``)."""
    return to_strict(v)[0]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file (a torn last line, from a crash mid-write, is skipped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class MetricsLogger:
    """Appends one JSON record per line to ``<out>/metrics.jsonl`` and mirrors scalars to TensorBoard.

    ``truncate_after(step)`` drops records of steps after a checkpoint, so a resumed run's file
    equals an uninterrupted run's.
    """

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True):
        self.path = pathlib.Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional dependency
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(pathlib.Path(out_dir) / "tensorboard"))
        self._f = open(self.path, "a")

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def truncate_after(self, step: int) -> None:
        self._f.close()
        keep = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def log(self, record: Mapping[str, Any]) -> None:
        line = dumps(dict(record), sort_keys=True)
        rec = json.loads(line)
        self._f.write(line + "\n")
        self._f.flush()
        if self._tb is not None:
            step = int(rec.get("step", 0))
            prefix = rec.get("event", "step")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
