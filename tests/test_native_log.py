"""XLA's native log lines during a compile become DEBUG records; a failing compile keeps them on stderr."""
from __future__ import annotations

import logging
import os

import pytest

from diffnas_jax.search.native_log import LOGGER_NAME, xla_log_to_debug


def test_native_writes_become_debug_records(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    with xla_log_to_debug():
        os.write(2, b"E0000 slow_operation_alarm.cc:73] Very slow compile?\n\n")
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME] == [
        "E0000 slow_operation_alarm.cc:73] Very slow compile?"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == LOGGER_NAME)


def test_a_failing_block_puts_the_text_back_on_stderr(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    with pytest.raises(RuntimeError, match="compile failed"):
        with xla_log_to_debug():
            os.write(2, b"F0000 diagnostic from XLA\n")
            raise RuntimeError("compile failed")
    assert "F0000 diagnostic from XLA" in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name == LOGGER_NAME]
    os.write(2, b"")  # fd 2 is usable again


def test_cli_rejects_a_bad_log_level(monkeypatch, capsys):
    from diffnas_jax.cli import _configure_logging

    monkeypatch.setenv("DIFFNAS_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as e:
        _configure_logging()
    assert e.value.code == 2 and "DIFFNAS_LOG_LEVEL" in capsys.readouterr().err
