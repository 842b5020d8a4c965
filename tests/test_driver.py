"""The search driver: exact resume, checkpoint faults, used --out, vmapped seeds, sharding.

A tiny user-defined space (one Choice over three candidates, a BatchNorm) on a tiny synthetic
task keeps compile time small; the persistent compilation cache of this module lets the several
runs of the same configuration compile once.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("diffnas_jax.relaxations", reason="the driver builds methods from diffnas_jax.relaxations")

from diffnas_jax.data import synthetic  # noqa: E402
from diffnas_jax.nn import Choice  # noqa: E402
from diffnas_jax.search.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint  # noqa: E402
from diffnas_jax.search.driver import RunInUseError, SearchConfig, run_search  # noqa: E402
from diffnas_jax.spaces import from_module  # noqa: E402


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = Choice([nn.Conv(4, (3, 3)), nn.Conv(4, (1, 1)), lambda v: v], names=["conv3", "conv1", "skip"])(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(4)(jax.nn.relu(x).mean((1, 2)))


@pytest.fixture(scope="module")
def tiny():
    ds = synthetic(0, num_train=48, num_val=48, num_test=16, image_size=4)
    space = from_module(TinyNet(), jnp.zeros((2, 4, 4, 1), jnp.float32))
    return ds, space


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


BASE = dict(epochs=2, batch_size=16, progress=False, plots=False, checkpoint_every=2, dataset="synthetic")


def _cfg(out, **kw):
    return SearchConfig(out=str(out), **{**BASE, **kw})


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    ds, space = tiny
    out = tmp_path_factory.mktemp("full")
    return out, run_search(_cfg(out), dataset=ds, space=space)


def test_resume_after_sigterm_is_bitwise_equal(tiny, uninterrupted, tmp_path):
    ds, space = tiny
    full_out, full = uninterrupted
    assert full["status"] == "complete" and full["steps"] == 6

    def kill_at_4(step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    part = run_search(_cfg(tmp_path), dataset=ds, space=space, on_step=kill_at_4)
    assert part["status"] == "interrupted" and part["step"] == 4
    assert not (tmp_path / "result.json").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "step_00000004"
    resumed = run_search(_cfg(tmp_path, resume=True), dataset=ds, space=space)
    assert resumed["genotype"] == full["genotype"]
    # arch logits bitwise equal (JSON keeps float32 values exactly as float64 reprs)
    assert resumed["seeds"][0]["arch"] == full["seeds"][0]["arch"]
    assert (tmp_path / "metrics.jsonl").read_text() == (full_out / "metrics.jsonl").read_text()
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"genotype", "seeds", "search_time_s", "config", "versions"} <= set(result)


def test_used_out_is_refused(tiny, uninterrupted):
    ds, space = tiny
    out, _ = uninterrupted
    with pytest.raises(RunInUseError, match="--resume"):
        run_search(_cfg(out), dataset=ds, space=space)
    with pytest.raises(RunInUseError, match="another configuration"):
        run_search(_cfg(out, resume=True, seed=5), dataset=ds, space=space)


def test_corrupt_checkpoint_is_named_and_last_good_one_kept(tiny, tmp_path):
    ds, space = tiny
    part = run_search(_cfg(tmp_path, max_steps=4), dataset=ds, space=space)
    assert part["status"] == "interrupted"
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    victim = max((p for p in (ckpts[-1] / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(victim)):
        run_search(_cfg(tmp_path, resume=True), dataset=ds, space=space)
    # nothing was overwritten: the earlier checkpoint verifies, the bad one is still bad
    assert verify_checkpoint(ckpts[0])["step"] == 2
    assert victim.read_bytes() == data[: len(data) // 2]
    # deleting the bad checkpoint resumes from the earlier one
    shutil.rmtree(ckpts[-1])
    done = run_search(_cfg(tmp_path, resume=True), dataset=ds, space=space)
    assert done["status"] == "complete"


def test_vmapped_seeds_match_separate_runs(tiny, uninterrupted, tmp_path):
    ds, space = tiny
    _, full = uninterrupted  # seed 0
    both = run_search(_cfg(tmp_path / "v", seeds=(0, 3)), dataset=ds, space=space)
    one3 = run_search(_cfg(tmp_path / "s3", seed=3), dataset=ds, space=space)
    assert len(both["seeds"]) == 2
    for got, ref in ((both["seeds"][0], full["seeds"][0]), (both["seeds"][1], one3["seeds"][0])):
        a = np.asarray(jax.tree.leaves(got["arch"]), np.float64)
        b = np.asarray(jax.tree.leaves(ref["arch"]), np.float64)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert got["genotype"] == ref["genotype"]
    # the two seeds really are different searches
    assert both["seeds"][0]["arch"] != both["seeds"][1]["arch"]


_SHARDING_SCRIPT = textwrap.dedent("""
    import os, sys
    # four CPU devices, on top of the test process's compile flags (conftest: optimisation level 0)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_driver import TinyNet
    from diffnas_jax.data import synthetic
    from diffnas_jax.search.driver import SearchConfig, build_search, init_state, make_jitted_step, shard_batch, replicate
    from diffnas_jax.search.step import cross_entropy
    from diffnas_jax.spaces import from_module
    assert len(jax.devices()) == 4, jax.devices()
    ds = synthetic(0, num_train=48, num_val=48, num_test=16, image_size=4)
    space = from_module(TinyNet(), jnp.zeros((2, 4, 4, 1), jnp.float32))
    res = {}
    for n in (1, 4):
        setup = build_search(SearchConfig(devices=n, batch_size=16, epochs=1, dataset="synthetic"), ds, space)
        st = replicate(init_state(setup), setup.mesh)
        bt = shard_batch((ds.x_train[:16], ds.y_train[:16]), setup.mesh)
        bv = shard_batch((ds.x_val[:16], ds.y_val[:16]), setup.mesh)
        if n == 4:
            assert len(bt[0].sharding.device_set) == 4
        def val_loss(arch, w, s, x, y):
            mix = setup.relaxation(arch, jax.random.key(0), 0)
            return cross_entropy(space.apply(w, s, mix, x, True)[0], y)
        g = jax.jit(jax.grad(val_loss))(st.arch, st.weights, st.model_state, *bv)
        new, m = make_jitted_step(setup)(st, bt, bv, jax.random.key(1), jnp.asarray(False))
        res[n] = (jax.tree.leaves(g), jax.tree.leaves(new.arch), float(m["arch_grad_norm"]))
    for a, b in zip(res[1][0], res[4][0]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for a, b in zip(res[1][1], res[4][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res[1][2], res[4][2], rtol=1e-5)
    assert max(float(np.abs(np.asarray(a)).max()) for a in res[1][0]) > 0
    print("SHARDING_OK")
""")


def test_four_device_sharding_equals_single_device(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(_SHARDING_SCRIPT)
    env = {**os.environ, "TEST_DIR": os.path.dirname(__file__), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHARDING_OK" in proc.stdout


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        SearchConfig(batch_size=10, devices=4)
    with pytest.raises(ValueError, match="space"):
        SearchConfig(space="resnet")
    with pytest.raises(ValueError, match="seeds"):
        SearchConfig(seeds=(1, 1))


@pytest.mark.parametrize("method", ["sddarts", "fairdarts"])
def test_methods_with_objectives_run_end_to_end(tiny, tmp_path, method):
    """SD-DARTS (stateful self-distillation objective) and FairDARTS (zero-one regulariser with
    sigmoid mixing) through the driver, including the objective state in the checkpoints."""
    ds, space = tiny
    result = run_search(_cfg(tmp_path / method, method=method, epochs=1, checkpoint_every=1), dataset=ds,
                        space=space)
    assert result["config"]["method"] == method
    final = result["seeds"][0]["final_metrics"]
    assert final and all(np.isfinite(v) for v in final.values())
    assert result["status"] == "complete" and result["genotype"]
    assert list_checkpoints(tmp_path / method / "checkpoints")


@pytest.mark.parametrize("hypergrad,select", [("implicit", "perturbation"), ("unrolled", "argmax")])
def test_estimator_and_selector_overrides_run_end_to_end(tiny, tmp_path, hypergrad, select):
    """`--hypergrad implicit|unrolled` and `--select perturbation` through the driver."""
    ds, space = tiny
    out = tmp_path / f"{hypergrad}_{select}"
    result = run_search(_cfg(out, hypergrad=hypergrad, select=select, epochs=1), dataset=ds, space=space)
    assert result["status"] == "complete" and hypergrad in result["hypergradient"]
    sel = result["seeds"][0]["selection"]
    assert sel["selector"] == select
    if select == "perturbation":
        assert 0.0 <= sel["base_accuracy"] <= 1.0
    assert result["genotype"]


def _strict_load(path):
    """json.load that refuses NaN / Infinity tokens (as strict parsers do)."""
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_config_refuses_bad_hyperparameters():
    for kw, name in [(dict(arch_lr=float("nan")), "arch_lr"), (dict(weight_lr=float("inf")), "weight_lr"),
                     (dict(arch_lr=-1e-3), "arch_lr"), (dict(seed=-1), "seed"), (dict(seeds=(0, -2)), "seeds"),
                     (dict(hypergrad="foo"), "hypergrad")]:
        with pytest.raises(ValueError, match=name) as e:
            SearchConfig(**kw)
        if name == "hypergrad":
            assert "first_order" in str(e.value) and "implicit" in str(e.value)


def test_divergence_stops_with_status_and_keeps_last_finite_checkpoint(tiny, tmp_path):
    """An absurd weight lr blows the weights up at step 2: the run stops there, result.json
    (strict JSON) says "diverged" with step and quantity, the step-1 checkpoint is the last one."""
    ds, space = tiny
    seen = []
    result = run_search(_cfg(tmp_path, weight_lr=1e18, checkpoint_every=1), dataset=ds, space=space,
                        on_step=lambda s, m: seen.append(s))
    assert result["status"] == "diverged" and result["step"] == 2 and seen == [1]
    assert result["quantity"] in ("train_loss", "val_loss")
    assert "step 2" in result["message"] and result["quantity"] in result["message"]
    stored = _strict_load(tmp_path / "result.json")
    assert stored["status"] == "diverged" and stored["non_finite"]
    assert all(p.startswith("metrics_at_divergence/") for p in stored["non_finite"])
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000001"] and stored["last_checkpoint"].endswith("step_00000001")
    verify_checkpoint(ckpts[0])
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda t: pytest.fail(f"metrics.jsonl holds {t}"))
    # resuming repeats nothing: the stored verdict stands
    again = run_search(_cfg(tmp_path, weight_lr=1e18, checkpoint_every=1, resume=True), dataset=ds, space=space)
    assert again["status"] == "diverged" and again["already_complete"]


def test_nan_input_diverges_at_step_one_without_checkpoint(tiny, tmp_path):
    import dataclasses

    ds, space = tiny
    bad = dataclasses.replace(ds, x_train=np.full_like(ds.x_train, np.nan))
    result = run_search(_cfg(tmp_path), dataset=bad, space=space)
    assert result["status"] == "diverged" and result["step"] == 1 and result["last_checkpoint"] is None
    assert not list_checkpoints(tmp_path / "checkpoints")


def test_resume_of_a_finished_run_leaves_it_unchanged(uninterrupted, tiny, tmp_path):
    ds, space = tiny
    src, _ = uninterrupted
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    res = run_search(_cfg(out, resume=True), dataset=ds, space=space)
    assert res["status"] == "complete" and res["already_complete"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_crash_between_last_checkpoint_and_result_recomputes_final_evaluation(uninterrupted, tiny, tmp_path):
    ds, space = tiny
    src, full = uninterrupted
    out = tmp_path / "crashed"
    shutil.copytree(src, out)
    (out / "result.json").unlink()
    res = run_search(_cfg(out, resume=True), dataset=ds, space=space)
    assert res["status"] == "complete" and "already_complete" not in res
    assert res["seeds"][0]["final_metrics"] == full["seeds"][0]["final_metrics"]
    assert res["seeds"][0]["final_metrics"]["val_acc"] is not None
    assert res["genotype"] == full["genotype"] and res["seeds"][0]["mix"] == full["seeds"][0]["mix"]
    _strict_load(out / "result.json")


def test_disk_full_names_the_directory_removes_temp_and_keeps_last_checkpoint(tiny, tmp_path, monkeypatch):
    import errno

    from diffnas_jax.search import checkpoint as ck

    ds, space = tiny
    real, calls = ck._write_state, []

    def write_then_fill_disk(path, state):
        calls.append(path)
        if len(calls) == 1:
            return real(path, state)
        path.mkdir(parents=True)
        (path / "partial").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "partial"))

    monkeypatch.setattr(ck, "_write_state", write_then_fill_disk)
    with pytest.raises(ck.CheckpointWriteError, match="No space left on device") as e:
        run_search(_cfg(tmp_path, checkpoint_every=1), dataset=ds, space=space)
    msg = str(e.value)
    assert "\n" not in msg and str((tmp_path / "checkpoints").absolute()) in msg
    ckpt_dir = tmp_path / "checkpoints"
    assert not list(ckpt_dir.glob(".tmp_step_*"))
    assert [c.name for c in list_checkpoints(ckpt_dir)] == ["step_00000001"]
    verify_checkpoint(ckpt_dir / "step_00000001")


def test_logged_mix_is_the_relaxations_not_softmax(tiny, tmp_path):
    """FairDARTS mixes with independent sigmoids: the saved mix must be sigmoid(arch), which does
    not sum to 1 (softmax(arch) would)."""
    ds, space = tiny
    res = run_search(_cfg(tmp_path, method="fairdarts", epochs=1), dataset=ds, space=space)
    arch = {"/".join(str(p.key) for p in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(res["seeds"][0]["arch"],
                                                               is_leaf=lambda x: isinstance(x, list))}
    mix = res["seeds"][0]["mix"]
    assert set(mix) == set(arch)
    for name, logits in arch.items():
        np.testing.assert_allclose(mix[name], jax.nn.sigmoid(logits), rtol=1e-5)
        assert abs(float(np.sum(mix[name])) - 1.0) > 1e-3  # not a softmax
    d = res["seeds"][0]["decision"]
    assert 0.0 <= d["mean_entropy"] <= 1.0 and 0.0 <= d["mean_margin"] <= 1.0


def test_scaled_arch_lr_keeps_the_papers_step_budget():
    from diffnas_jax.methods import get_method
    from diffnas_jax.search.driver import MAX_SCALED_ARCH_LR, scaled_arch_lr

    darts = get_method("darts")  # 3e-4 over 50 epochs x 391 CIFAR steps
    assert scaled_arch_lr(darts, 19_550) == pytest.approx(3e-4)
    assert scaled_arch_lr(darts, 10**7) == pytest.approx(3e-4)  # never below the paper's
    assert scaled_arch_lr(darts, 275) == pytest.approx(3e-4 * 19_550 / 275)  # the digits default
    assert scaled_arch_lr(darts, 1) == MAX_SCALED_ARCH_LR
    pc = get_method("pcdarts")  # 15 of 50 epochs warm-up, batch 256
    assert scaled_arch_lr(pc, 35 * 98) == pytest.approx(pc.arch_lr)


class TinyNet64(nn.Module):
    """TinyNet in float64: CG's rounding in float32 (1e-4 of the hypergradient after 10 iterations
    on this non-convex net) would hide a real difference behind the tolerance."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        x = nn.Conv(4, (3, 3), **f64)(x)
        x = Choice([nn.Conv(4, (3, 3), **f64), nn.Conv(4, (1, 1), **f64), lambda v: v],
                   names=["conv3", "conv1", "skip"])(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, **f64)(x)
        return nn.Dense(4, **f64)(jax.nn.relu(x).mean((1, 2)))


def test_staged_implicit_step_equals_fused_step(tiny):
    """implicit CG runs as host-chained programs by default (issue #20): two vmapped steps of the
    driver's compiled StagedStep equal the one fused program's (float64)."""
    from diffnas_jax.search.driver import StagedStep, _compile, build_search, init_state, make_jitted_step, step_keys

    ds, _ = tiny
    space = from_module(TinyNet64(), jnp.zeros((2, 4, 4, 1), jnp.float64))
    states = {}
    for staged in (True, False):
        cfg = SearchConfig(hypergrad="implicit", seeds=(0, 3), staged_step=staged, **{**BASE, "epochs": 1})
        setup = build_search(cfg, ds, space)
        jstep = make_jitted_step(setup)
        assert isinstance(jstep, StagedStep) == staged
        state = init_state(setup)
        init_arch = jax.device_get(state.arch)  # the step donates the state
        # flax starts BatchNorm statistics in float32 whatever the dtypes; the step returns float64
        state = state.replace(model_state=jax.tree.map(lambda x: x.astype(jnp.float64), state.model_state))
        assert jax.tree.leaves(state.weights)[0].dtype == jnp.float64
        for i in range(2):
            bt = tuple(np.stack([a[16 * i:16 * (i + 1)]] * 2) for a in (ds.x_train, ds.y_train))
            bv = tuple(np.stack([a[16 * i:16 * (i + 1)]] * 2) for a in (ds.x_val, ds.y_val))
            args = (state, bt, bv, step_keys(cfg, i), jnp.asarray(False))
            if i == 0:
                jstep, info = _compile(jstep, args)
                assert info["xla_compile_s"] >= 0 and info.get("programs", 1) == (3 if staged else 1)
            state, metrics = jstep(*args)
            assert all(bool(np.all(metrics[k])) for k in ("finite_weights", "finite_arch"))
        states[staged] = jax.device_get(state)
    moved = 0.0
    for x, y, x0 in zip(jax.tree.leaves(states[True].arch), jax.tree.leaves(states[False].arch),
                        jax.tree.leaves(init_arch)):
        moved = max(moved, float(np.max(np.abs(y - x0))))
    assert moved > 1e-3  # the architecture steps were taken (not frozen, not zero)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(states[True]), jax.tree.leaves(states[False])):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, err_msg=jax.tree_util.keystr(path))
