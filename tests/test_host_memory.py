"""``search.host_memory``: large host buffers on transparent huge pages (glibc >= 2.35)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from diffnas_jax import cli
from diffnas_jax.search import host_memory

VERSION = host_memory.glibc_version()
HUGETLB = VERSION is not None and VERSION >= (2, 35)
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP = _THP.exists() and "[never]" not in _THP.read_text()

# A program whose 128 MiB output is allocated at every call and freed before the next one: glibc
# maps that block afresh each time, so each call faults all of it in.
_STEPS = """
import json, resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0)
x = jnp.ones((32 * 2**20,), jnp.float32)
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults(extra_env: dict) -> list:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _STEPS], capture_output=True, text=True, check=True,
                         env={**env, **extra_env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (HUGETLB and THP), reason="needs glibc >= 2.35 and transparent huge pages")
def test_huge_pages_fault_the_buffers_in_512_times_less():
    pages = 32 * 2**20 * 4 // 4096  # the output's 4 KiB pages
    extra = host_memory.tunables("huge-pages", environ={})
    assert extra == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    default, huge = _faults({}), _faults(extra)
    # the mechanism: by default every later call faults the whole block in again ...
    assert min(default[1:]) > pages // 2
    # ... and on 2 MiB pages a small fraction of that
    assert max(huge[1:]) < pages // 20


@pytest.mark.skipif(not HUGETLB, reason="needs glibc >= 2.35")
def test_tunables_merge_and_respect_the_user():
    assert host_memory.tunables(environ={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert host_memory.tunables(environ={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {}
    assert host_memory.tunables("off", environ={}) == {}


def test_no_tunables_without_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "glibc_version", lambda: None)
    assert host_memory.tunables(environ={}) == {}
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 34))
    assert host_memory.tunables(environ={}) == {}


def test_setting_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="DIFFNAS_HOST_MEMORY"):
        host_memory.tunables("sometimes")
    with pytest.raises(TypeError, match="setting"):
        host_memory.tunables(1)
    monkeypatch.setenv(host_memory.ENV_VAR, "off")
    assert host_memory.tunables(environ={}) == {}


@pytest.mark.skipif(not HUGETLB, reason="needs glibc >= 2.35")
def test_advice_only_for_a_cpu_process_started_without_the_tunable(monkeypatch, capsys):
    hint = host_memory.advice("cpu", environ={})
    assert hint is not None and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in hint
    assert host_memory.advice("gpu", environ={}) is None
    assert host_memory.advice("cpu", environ={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
    assert host_memory.advice("cpu", "off", environ={}) is None
    # the search driver prints it once, before it compiles
    import jax
    import jax.numpy as jnp
    from diffnas_jax.search import driver

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    driver._compile(jax.jit(lambda x: x + 1), (jnp.ones(2),))
    err = capsys.readouterr().err
    assert err.count("GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == (1 if jax.default_backend() == "cpu" else 0)
    assert err.index("compiling the search step") > (err.find("GLIBC_TUNABLES") if "GLIBC" in err else -1)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    driver._compile(jax.jit(lambda x: x + 2), (jnp.ones(2),))
    assert "GLIBC_TUNABLES" not in capsys.readouterr().err


class _Exec(Exception):
    pass


def _record_exec(calls):
    def execve(path, argv, env):
        calls.append((path, list(argv), env))
        raise _Exec

    return execve


@pytest.mark.skipif(not HUGETLB, reason="needs glibc >= 2.35")
def test_cli_restarts_itself_with_huge_pages(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", _record_exec(calls))
    monkeypatch.setattr(cli, "cmd_search", lambda args: 0)
    monkeypatch.setattr(sys, "argv", ["diffnas", "search"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "/venv/bin/diffnas", "search"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    with pytest.raises(_Exec):
        cli.main()
    path, argv, env = calls[0]
    assert path == sys.executable and argv == [sys.executable, "/venv/bin/diffnas", "search"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    # the restarted process has the tunable and runs the command; so does one turned off,
    # and a call with explicit arguments (a library caller's process) is never replaced
    monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])
    assert cli.main() == 0
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert cli.main(["search"]) == 0
    monkeypatch.setenv(host_memory.ENV_VAR, "off")
    assert cli.main() == 0
    assert len(calls) == 1


def test_cli_refuses_a_bad_setting(monkeypatch, capsys):
    monkeypatch.setattr(os, "execve", _record_exec([]))
    monkeypatch.setattr(cli, "cmd_search", lambda args: 0)
    monkeypatch.setattr(sys, "argv", ["diffnas", "search"])
    monkeypatch.setenv(host_memory.ENV_VAR, "bogus")
    assert cli.main() == cli.EXIT_USAGE
    assert "DIFFNAS_HOST_MEMORY" in capsys.readouterr().err
