"""Atomic, verified orbax checkpoints of the whole search state.

Layout under ``<out>/checkpoints``::

    step_00000120/            a complete checkpoint (only ever created by one atomic rename)
      state/                  orbax StandardCheckpointer directory of the state pytree
      meta.json               host-side position (epoch, batch, step) and the run fingerprint
      digest.json             sha256 and size of every file above, written last
    .tmp_step_00000180/       a checkpoint being written (ignored, removed on the next save)

A checkpoint directory appears only when complete, so a crash mid-save leaves the previous
one untouched; older checkpoints are deleted only after a newer one is complete
(``keep`` most recent are kept). ``restore`` re-hashes every file and raises
:class:`CheckpointError` naming the first missing, truncated or altered file, never falling back
silently (the user decides, e.g. by deleting the bad directory to resume from the one before).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np

_STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or truncated, or does not belong to this run."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions); the message names the directory."""


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "digest.json")


def _to_savable(tree: Any) -> Any:
    """Typed PRNG keys become their uint32 key data (orbax stores plain arrays)."""
    def conv(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x
    return jax.tree.map(conv, tree)


def _from_savable(template: Any, restored: Any) -> Any:
    def conv(t, r):
        if isinstance(t, jax.Array) and jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
        return r
    return jax.tree.map(conv, template, restored)


def os_error(exc: BaseException) -> OSError | None:
    """The :class:`OSError` behind ``exc`` (orbax re-raises I/O errors from its writer threads)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _write_state(path: pathlib.Path, host_state: Any) -> None:
    """Write a pytree of numpy arrays with orbax (one function, so tests can make it fail)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path, host_state)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoint directories under ``ckpt_dir``, oldest first."""
    d = pathlib.Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: Any, meta: dict, *, keep: int = 2
                    ) -> pathlib.Path:
    """Write ``state`` (any pytree of arrays) and ``meta`` (JSON-able) as checkpoint ``step``.

    Atomic: everything is written into ``.tmp_step_N`` and then renamed. An existing complete
    checkpoint of the same step is left as it is (it holds the same state).
    """
    d = pathlib.Path(ckpt_dir).absolute()
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:08d}"
    if final.exists():
        return final
    for stale in d.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = d / f".tmp_step_{step:08d}"
    try:
        tmp.mkdir()
        _write_state(tmp / "state", jax.tree.map(np.asarray, jax.device_get(_to_savable(state))))
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": int(step)}, indent=1, sort_keys=True))
        digest = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "size": p.stat().st_size} for p in _files(tmp)}
        with open(tmp / "digest.json", "w") as f:
            json.dump(digest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        # a half-written checkpoint must not survive (it would fill the disk further and
        # be mistaken for progress); the previous complete one is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        err = os_error(e)
        if err is not None:
            raise CheckpointWriteError(f"cannot write checkpoint step {step} to {d}: {err.strerror or err}; "
                                       "the temporary folder was removed and the previous checkpoint kept"
                                       ) from None
        raise
    for old in list_checkpoints(d)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file of checkpoint ``path`` against its digest; return its meta.

    Raises:
      CheckpointError: naming the missing, truncated or altered file.
    """
    path = pathlib.Path(path)
    dig_path = path / "digest.json"
    hint = (" Delete this checkpoint directory to resume from an earlier one, or start a new run "
            "in another --out.")
    try:
        digest = json.loads(dig_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {dig_path}.{hint}") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint file {dig_path} is corrupt ({e}).{hint}") from None
    for rel, info in sorted(digest.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file missing: {f}.{hint}")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupt: {size} bytes, "
                                  f"expected {info['size']}.{hint}")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt (sha256 mismatch).{hint}")
    try:
        return json.loads((path / "meta.json").read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint file {path / 'meta.json'} is corrupt ({e}).{hint}") from None


def restore_checkpoint(path: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """Verify and restore checkpoint ``path`` into the structure, shapes and dtypes of ``template``.

    Returns:
      ``(state, meta)``.
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    meta = verify_checkpoint(path)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            jax.device_get(_to_savable(template)))
    ckptr = ocp.StandardCheckpointer()
    try:
        restored = ckptr.restore(path / "state", abstract)
    except Exception as e:  # orbax raises many types; the user needs the path
        raise CheckpointError(f"checkpoint {path / 'state'} could not be restored ({type(e).__name__}: {e}); "
                              "it does not match this run's search state or is corrupt") from None
    finally:
        ckptr.close()
    restored = jax.tree.map(np.asarray, restored)
    return _from_savable(template, restored), meta


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint directory, or ``None``."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None
