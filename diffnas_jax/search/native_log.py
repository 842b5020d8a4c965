"""XLA's native log lines during a compile go to Python logging at DEBUG, not to the terminal.

XLA's C++ logger writes straight to file descriptor 2, e.g. the "Very slow compile? ... The
operation took 3m52s" alarm that a CPU compile of a supernet triggers. It is harmless, but in a
user's terminal or notebook it reads like a failure. :func:`xla_log_to_debug` points fd 2 at a
temporary file for the duration of a compile and hands what XLA wrote to the logger
``diffnas_jax.xla`` at DEBUG level (``logging.getLogger("diffnas_jax.xla").setLevel("DEBUG")``
plus a handler shows them; the CLI does that under ``DIFFNAS_LOG_LEVEL=DEBUG``). If the compile
raises, the captured text goes back to stderr unchanged: an error's diagnostics stay visible.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

LOGGER_NAME = "diffnas_jax.xla"


@contextlib.contextmanager
def xla_log_to_debug() -> Iterator[None]:
    """Capture what native code writes to fd 2 inside the block; log it at DEBUG afterwards.

    Where fd 2 cannot be duplicated (an embedded interpreter without one) the block runs
    uncaptured. Python writes to ``sys.stderr`` inside the block are captured too, so keep the
    block to the compile call itself.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace")
            if text and failed:
                sys.stderr.write(text)
                sys.stderr.flush()
            elif text:
                log = logging.getLogger(LOGGER_NAME)
                for line in text.splitlines():
                    if line.strip():
                        log.debug("%s", line)
