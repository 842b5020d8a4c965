"""The benchmark's reading of the optimised HLO (``bench_supernet._convolution_kinds``): which
convolution kernels compute a depthwise forward pass, its input gradient, or its kernel gradient
(XLA:CPU expands the latter into a dense (E*C) x (E*C) convolution, BUILD_NOTES section 5, round 6).  A change of
XLA:CPU's lowering shows up here, so the profile's labels stay true."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT, load_script
from diffnas_jax.spaces import layers


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's lowering")
def test_convolution_kinds_label_forward_input_and_kernel_gradients():
    bench = load_script(ROOT / "benchmarks" / "bench_supernet.py", "bench_supernet")
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    kern = jnp.ones((3, 3, 1, 4), jnp.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(layers.depthwise_conv(x, w, 1, 1, 1, "grouped")))  # noqa: E731
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, kern).compile().as_text()
    kinds = collections.Counter(bench._convolution_kinds(hlo).values())
    assert kinds["grouped depthwise, forward"] >= 1
    assert kinds["grouped depthwise, input gradient"] >= 1
    assert kinds["depthwise kernel gradient (dense (E*C)x(E*C) convolution)"] >= 1
    # the forward pass alone has no gradient kernels
    fwd = jax.jit(loss).lower(x, kern).compile().as_text()
    assert set(bench._convolution_kinds(fwd).values()) == {"grouped depthwise, forward"}
