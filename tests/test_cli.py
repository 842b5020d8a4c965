"""The ``diffnas`` command line: instant --help, a tiny end-to-end search / evaluate / baseline."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from diffnas_jax.cli import build_parser, main

@pytest.fixture(scope="module", autouse=True)
def private_compile_cache(tmp_path_factory):
    # never the user's ~/.cache: runs of this module share a temporary persistent cache
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFNAS_COMPILE_CACHE", str(tmp_path_factory.mktemp("xla_cache")))
    yield
    mp.undo()


# the CLI runs in float32
pytestmark = pytest.mark.usefixtures("float32_module")


def _strict_load(path):
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


TINY = ["--dataset", "synthetic", "--channels", "2", "--layers", "1", "--batch-size", "32", "--no-progress"]


def test_help_is_instant_and_imports_no_jax():
    code = ("import sys; from diffnas_jax.cli import build_parser; build_parser().format_help(); "
            "assert 'jax' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "diffnas_jax.cli", "search", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--space", "--method", "--hypergrad", "--select", "--dataset", "--data-dir", "--epochs",
                 "--seeds", "--out", "--resume", "--devices"):
        assert flag in out


def test_parser_rejects_bad_flags():
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["search", "--seed", "1", "--seeds", "0,1"])
    with pytest.raises(SystemExit):
        p.parse_args(["search", "--seeds", "a,b"])
    with pytest.raises(SystemExit):
        p.parse_args(["search", "--space", "vgg"])
    assert p.parse_args(["search", "--seeds", "0,1,2,3"]).seeds == (0, 1, 2, 3)
    assert p.parse_args(["search"]).space == "nb201"


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    pytest.importorskip("diffnas_jax.relaxations", reason="the driver builds methods from diffnas_jax.relaxations")
    out = tmp_path_factory.mktemp("run")
    rc = main(["search", "--out", str(out), "--epochs", "2", *TINY])
    return out, rc


def test_search_writes_results_and_plots(searched):
    out, rc = searched
    assert rc == 0
    result = _strict_load(out / "result.json")
    assert result["genotype"].startswith("|") and result["space"] == "nb201"
    assert "default_space" not in json.dumps(result)
    # the persistent compilation cache is on by default (here the test's private directory)
    cache = pathlib.Path(os.environ["DIFFNAS_COMPILE_CACHE"])
    assert result["compile"]["compile_cache"] == str(cache) and any(cache.iterdir())
    assert result["compile"]["xla_compile_s"] >= 0 and result["compile"]["trace_s"] > 0
    d = result["seeds"][0]["decision"]
    assert len(d["edges"]["cell"]["margin"]) == 6 and len(d["edges"]["cell"]["entropy"]) == 6
    assert all(0.0 <= m <= 1.0 for m in d["edges"]["cell"]["margin"]) and isinstance(result["decided"], bool)
    assert result["config"]["dataset"] == "synthetic" and "jax" in result["versions"]
    assert result["search_time_s"] > 0 and len(result["seeds"][0]["arch"]["cell"]) == 6
    probs = np.asarray(result["seeds"][0]["mix"]["cell"])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["event"] == "step"]
    epochs = [r for r in lines if r["event"] == "epoch"]
    assert len(steps) == result["steps"] and len(epochs) == 2
    assert all(np.isfinite(r["train_loss"]) for r in steps)
    for name in ("cell.png", "arch_weights.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints").is_dir()
    # a second search into the same folder is refused with a clear message
    assert main(["search", "--out", str(out), "--epochs", "2", *TINY]) == 2


def test_evaluate_from_result(searched, tmp_path):
    out, _ = searched
    rc = main(["evaluate", "--result", str(out / "result.json"), "--epochs", "1", "--channels", "2",
               "--batch-size", "32", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    ev = _strict_load(tmp_path / "eval.json")
    assert 0.0 <= ev["test_accuracy"] <= 1.0 and ev["params"] > 0 and ev["flops"] > 0
    assert ev["config"]["channels"] == 2 and ev["config"]["layers"] == 1  # real values, not null
    assert ev["genotype"] == json.loads((out / "result.json").read_text())["genotype"]


def test_baseline_bookkeeping(tmp_path, monkeypatch):
    """Summary statistics, incremental baseline.json and continuation (training stubbed out)."""
    import diffnas_jax.search.evaluate as ev

    calls = []

    def fake_train(g, cfg, dataset=None, **kw):
        calls.append(str(g))
        return {"genotype": str(g), "test_accuracy": 0.1 * len(calls), "train_accuracy": 1.0, "params": 1,
                "flops": 2.0, "train_time_s": 0.0}

    monkeypatch.setattr(ev, "train_and_evaluate", fake_train)
    args = ["baseline", "--num", "3", "--dataset", "synthetic", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    b = json.loads((tmp_path / "baseline.json").read_text())
    accs = [a["test_accuracy"] for a in b["architectures"]]
    assert len(set(a["genotype"] for a in b["architectures"])) == 3 and b["complete"]
    assert b["mean"] == pytest.approx(0.2) and b["median"] == pytest.approx(0.2) and b["best"] == pytest.approx(0.3)
    assert all(a["genotype"].startswith("|") for a in b["architectures"]) and accs == sorted(accs)
    # same protocol again: nothing is retrained
    assert main(args) == 0 and len(calls) == 3


@pytest.mark.slow
def test_baseline_random(tmp_path):
    rc = main(["baseline", "--num", "2", "--epochs", "1", "--channels", "2", "--dataset", "synthetic",
               "--batch-size", "32", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    b = json.loads((tmp_path / "baseline.json").read_text())
    accs = [a["test_accuracy"] for a in b["architectures"]]
    assert len(accs) == 2 and b["complete"]
    assert b["median"] == pytest.approx(float(np.median(accs))) and b["best"] == max(accs)


def test_evaluate_errors_are_clear(tmp_path, capsys):
    assert main(["evaluate", "--result", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main(["search", "--dataset", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "missing.npz" in capsys.readouterr().err


def test_profile_writes_a_table_and_compares(tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert main(["profile", "--space", "nb201", "--input", "8,8,3", "--repeats", "2", "--warmup", "1",
                 "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table and "nb201" in capsys.readouterr().out
    assert main(["profile", "--space", "nb201", "--input", "8,8,3", "--repeats", "2", "--warmup", "1",
                 "--out", str(tmp_path / "lat2.json"), "--compare", str(out)]) == 0
    ratios = [float(line.split(":")[1].rstrip("x")) for line in capsys.readouterr().out.splitlines()[1:]]
    assert ratios and all(np.isfinite(r) and r > 0 for r in ratios)


_NO_JAX_RUN = """
import sys
from diffnas_jax.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
assert "jax" not in sys.modules, "jax was imported before the arguments were checked"
sys.exit(rc)
"""


@pytest.mark.parametrize("flags, needle", [
    (["--seed", "-1"], "--seed"), (["--seeds", "0,-1"], "--seeds"),
    (["--method", "foo"], "known methods: darts"),
    (["--hypergrad", "foo"], "'first_order', 'single_level', 'unrolled', 'unrolled_k', 'implicit', 'rarts'"),
    (["--arch-lr", "nan"], "--arch-lr"), (["--arch-lr", "inf"], "--arch-lr"), (["--weight-lr", "-0.1"], "--weight-lr"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--dataset", "missing.npz"], "missing.npz"),
])
def test_bad_search_flags_refused_before_jax_is_imported(flags, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _NO_JAX_RUN, "search", "--out", str(tmp_path / "o"), *flags],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("diffnas search: error:")
    assert not (tmp_path / "o").exists()


def test_resume_of_finished_run_through_cli_leaves_result(searched, tmp_path, capsys):
    import shutil

    out, _ = searched
    copy = tmp_path / "B"
    shutil.copytree(out, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    assert main(["search", "--out", str(copy), "--epochs", "2", *TINY, "--resume"]) == 0
    assert "already complete; result.json left unchanged" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_diverged_search_exits_nonzero_with_one_line(tmp_path, capsys, monkeypatch):
    """NaN images (the same shapes and flags as `searched`, so the compiled step comes from the
    cache): the search stops at step 1, exit status 3, one line, a strict result.json."""
    import dataclasses

    import diffnas_jax.data as data

    real = data.load_dataset

    def poisoned(*a, **k):
        ds = real(*a, **k)
        return dataclasses.replace(ds, x_train=np.full_like(ds.x_train, np.nan))

    monkeypatch.setattr(data, "load_dataset", poisoned)
    out = tmp_path / "N"
    rc = main(["search", "--out", str(out), "--epochs", "2", *TINY])
    err = capsys.readouterr().err
    assert rc == 3
    line = [l for l in err.splitlines() if l.startswith("diffnas search: error:")]
    assert len(line) == 1 and "diverged at step" in line[0] and "Traceback" not in err
    assert "step 1:" in line[0] and "no checkpoint was written" in line[0]
    result = _strict_load(out / "result.json")
    assert result["status"] == "diverged" and result["quantity"] in line[0] and result["step"] == 1


def test_disk_full_is_one_line_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    from diffnas_jax.search import checkpoint as ck
    from diffnas_jax.search.checkpoint import list_checkpoints, verify_checkpoint

    real, calls = ck._write_state, []

    def fill_disk(path, state):
        calls.append(path)
        if len(calls) == 1:
            return real(path, state)
        path.mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_write_state", fill_disk)
    out = tmp_path / "full"
    rc = main(["search", "--out", str(out), "--epochs", "2", "--checkpoint-every", "1", *TINY])
    err = capsys.readouterr().err
    assert rc == 4 and "Traceback" not in err
    line = [l for l in err.splitlines() if l.startswith("diffnas search: error:")]
    assert len(line) == 1 and "No space left on device" in line[0] and str(out / "checkpoints") in line[0]
    assert not list((out / "checkpoints").glob(".tmp_step_*"))
    ckpts = list_checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000001"]
    verify_checkpoint(ckpts[0])


@pytest.mark.parametrize("content, needle", [("{not json", "not a readable JSON file"),
                                             ('{"status": "complete"}', "no 'seeds' list"),
                                             ('{"status": "diverged", "step": 3}', "status is 'diverged'"),
                                             ("[1, 2]", "no 'seeds' list")])
def test_evaluate_bad_result_file_is_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "result.json"
    path.write_text(content)
    assert main(["evaluate", "--result", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_profile_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--input", "a,b,c"])
    assert e.value.code == 2
    assert "--input: expected H,W,C" in capsys.readouterr().err


def test_help_shows_size_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["search"].format_help()
    text = " ".join(text.split())  # argparse wraps the help lines
    assert "default per space: nb201 8, darts 8" in text and "nb201 1, darts 3" in text


def test_light_name_lists_match_the_library():
    import diffnas_jax.hypergrad as hg
    from diffnas_jax._choices import HYPERGRADIENTS
    from diffnas_jax.search.driver import SearchConfig

    from diffnas_jax._choices import BASELINE_STRATEGIES
    from diffnas_jax.baselines.strategies import STRATEGIES

    assert set(BASELINE_STRATEGIES) == set(STRATEGIES)
    estimators = {n for n in hg.__all__ if n[0].islower() and n != "dominant_eigenvalue"}
    assert set(HYPERGRADIENTS) == estimators
    for name in HYPERGRADIENTS:
        SearchConfig(hypergrad=name)


@pytest.mark.parametrize("strategy", ["local_search", "evolution", "bananas"])
def test_guided_baselines_use_val_then_test_best_and_resume(tmp_path, monkeypatch, strategy):
    """Strategies see validation accuracy (trained on train only); the best is retrained on
    train+val and tested; a rerun replays stored answers and trains nothing new."""
    import diffnas_jax.search.evaluate as ev

    calls = []

    def fake_train(g, cfg, dataset=None, **kw):
        calls.append((str(g), len(dataset.y_val), len(dataset.y_test)))
        score = sum(ord(c) for c in str(g)) % 97 / 97.0
        return {"genotype": str(g), "test_accuracy": score, "train_accuracy": 1.0, "params": 1, "flops": 2.0,
                "train_time_s": 0.0}

    monkeypatch.setattr(ev, "train_and_evaluate", fake_train)
    args = ["baseline", "--strategy", strategy, "--num", "6", "--dataset", "synthetic", "--out", str(tmp_path),
            "--no-progress"]
    assert main(args) == 0
    b = _strict_load(tmp_path / "baseline.json")
    rows = b["architectures"]
    assert b["complete"] and b["strategy"] == strategy and len(rows) == 6 == len({r["genotype"] for r in rows})
    queries, final = calls[:-1], calls[-1]
    assert all(n_val == 0 for _, n_val, _ in queries)          # trained on train only ...
    n_test_sel = queries[0][2]
    assert final[1] > 0 and final[2] != n_test_sel              # ... the best on train+val, tested on test
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert b["best"]["genotype"] == best["genotype"] == final[0]
    assert b["best_so_far"][-1] == pytest.approx(best["val_accuracy"])
    n = len(calls)
    assert main(args) == 0 and len(calls) == n                  # resumed: nothing retrained
    assert _strict_load(tmp_path / "baseline.json")["architectures"] == rows
