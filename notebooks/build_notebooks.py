"""Writes the notebooks of this folder from the cell sources below (outputs cleared).

    python notebooks/build_notebooks.py

Edit the sources here, not the .ipynb files, so the notebooks stay reviewable as code.
"""
from __future__ import annotations

import pathlib

import nbformat

HERE = pathlib.Path(__file__).parent

# A fresh top-to-bottom run of each notebook with its full settings (QUICK off, SCALE = 1), measured
# with `python notebooks/time_notebooks.py` (fresh kernel, JAX's compile cache cold) on the
# project's 2-core CPU while other jobs shared it (so the wall times are inflated; the kernel's
# CPU time, all threads, is the steadier figure). Update them when a notebook changes.
_CLAIM = ("{wall} wall ({cpu} s of CPU time) for the whole notebook with the settings below,\n"
          "# on a 2-core CPU shared with other jobs (load average {load}); faster on an idle machine")
MEASURED = {
    "01_relaxed_operators.ipynb": _CLAIM.format(wall="59 s", cpu=31, load="7-8"),
    "02_darts_search.ipynb": _CLAIM.format(wall="344 s (5 min 44 s)", cpu=133, load="~11"),
    "03_implicit_hypergradients.ipynb": _CLAIM.format(wall="56 s", cpu=30, load="6-7"),
    # a whole run at load 8-14 was stopped at 720 s; measured in parts with the notebook's code
    "04_hardware_aware.ipynb": ("about 700 s (~12 min) wall, in parts: the notebook's code with 2 of its 4 lambdas took\n"
                                "# 395 s, each further lambda 151 s (3.8 s per step), on a 2-core CPU shared with other "
                                "jobs\n# (load average 7-9); faster on an idle machine"),
}

INSTALL = '''# Install diffnas_jax if this kernel lacks it. It is NOT published on PyPI, so this cell installs,
# in this order, whichever it finds (Colab was NOT tested from the environment these notebooks were
# written in, which has no internet; routes 2 and 3 are the ones for Colab):
#   1. the checkout this notebook sits in (local Jupyter, opened from notebooks/): `pip install -e ..`;
#   2. a wheel uploaded next to the notebook (Colab): on your machine, in the repository, run
#      `DIFFNAS_BUILD_KERNEL=0 pip wheel . --no-deps -w dist` (a pure-Python wheel: without the
#      0 it holds the CPU kernels built for your OS and Python only), then upload
#      dist/diffnas_jax-*.whl with Colab's Files panel (it lands in /content, the notebook's folder);
#   3. a git URL you set in REPO, e.g. your fork: REPO = "https://github.com/<you>/diffnas_jax.git".
# If pip replaced Colab's preinstalled jax, restart the runtime once and run the cells again.
REPO = ""
import glob, os
try:
    import diffnas_jax
except ImportError:
    wheels = sorted(glob.glob("diffnas_jax-*.whl") + glob.glob("/content/diffnas_jax-*.whl"))
    if os.path.exists("../pyproject.toml"):
        %pip install -q -e ..
    elif wheels:
        %pip install -q {wheels[-1]}
    elif REPO:
        %pip install -q "diffnas-jax @ git+{REPO}"
    else:
        raise RuntimeError("diffnas_jax is not installed and not on PyPI: upload a wheel built with "
                           "`DIFFNAS_BUILD_KERNEL=0 pip wheel . --no-deps -w dist`, or set REPO to a git URL "
                           "of the repository")
    import importlib, sys
    if os.path.exists("../pyproject.toml"):  # an editable install is seen only after a kernel restart
        sys.path.insert(0, os.path.abspath(".."))
    importlib.invalidate_caches()
    import diffnas_jax
# On Linux, a CPU search steps faster when Jupyter was started with
# GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (README, "Host memory"; the `diffnas` command sets it itself).
import jax
BACKEND = jax.default_backend()
print("JAX", jax.__version__, "backend:", BACKEND, jax.devices())
# Measured: TIME_CLAIM.'''

SETTINGS = '''# Settings. The defaults are the notebook as measured in the cell above; the test suite runs it
# small with DIFFNAS_NOTEBOOK_QUICK=1 (a smoke test of the code, not a result). Any knob can also
# be set on its own, e.g. DIFFNAS_NOTEBOOK_EPOCHS=10.
import os
QUICK = os.environ.get("DIFFNAS_NOTEBOOK_QUICK") == "1"
def knob(name, full, quick):
    """The value of setting `name`: $DIFFNAS_NOTEBOOK_<name>, else `quick` or `full`."""
    value = os.environ.get("DIFFNAS_NOTEBOOK_" + name)
    return type(full)(value) if value is not None else (quick if QUICK else full)
SCALE = 1 if BACKEND == "cpu" else 4  # a GPU/TPU affords longer runs
'''


def install_cell(name: str):
    return code(INSTALL.replace("TIME_CLAIM", MEASURED[name]))


def settings_cell(knobs: str):
    return code(SETTINGS + knobs)


def md(s):
    return nbformat.v4.new_markdown_cell(s)


def code(s):
    return nbformat.v4.new_code_cell(s)


NOTEBOOKS = {}

NOTEBOOKS["01_relaxed_operators.ipynb"] = [
    md("# A tour of `diffnas_jax.relax`\n\nRelaxed discrete operators as pure JAX functions: soft "
       "sort and rank (Blondel et al. 2020), differentiable sorting networks (Petersen et al. "
       "2021/2022), NeuralSort (Grover et al. 2019), SoftSort (Prillo & Eisenschlos 2020), Sinkhorn "
       "sort/rank (Cuturi et al. 2019), soft top-k (Sander et al. 2023; Xie et al. 2020), perturbed "
       "optimizers (Berthet et al. 2020), Gumbel-softmax / top-k (Jang et al. 2017; Xie & Ermon 2019) and straight-through "
       "estimators. Every operator works on the last axis, "
       "batches, and composes with `jit`, `vmap` and `grad`."),
    install_cell("01_relaxed_operators.ipynb"),
    settings_cell('''DRAWS = knob("DRAWS", 2000, 200) * SCALE        # Gumbel-softmax samples for the frequency plot
PERTURBED = knob("PERTURBED", 500, 50) * SCALE  # Monte-Carlo samples of perturbed_argmax'''),
    code('''import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from diffnas_jax import relax
x = jnp.array([0.3, -1.2, 2.0, 0.9, 0.95, -0.1])
print("values           ", x)
print("hard ranks       ", jnp.argsort(jnp.argsort(x)) + 1)
for eps in (0.01, 0.3, 3.0):
    print(f"soft_rank eps={eps:<5}", np.round(relax.soft_rank(x, regularization_strength=eps), 3))'''),
    md("## Soft sort and rank: the regularization strength interpolates between the hard operator and the mean"),
    code('''eps = jnp.logspace(-3, 1.5, 60)
# each sweep is one jit-compiled vmap (run op by op, every small op would be compiled on its own)
ranks = jax.jit(jax.vmap(lambda e: relax.soft_rank(x, regularization_strength=e)))(eps)
sorts = jax.jit(jax.vmap(lambda e: relax.soft_sort(x, regularization_strength=e)))(eps)
grads = jax.jit(jax.vmap(jax.grad(lambda v, e: relax.soft_rank(v, regularization_strength=e)[2]), in_axes=(None, 0)))(x, eps)
fig, ax = plt.subplots(1, 3, figsize=(15, 3.5))
ax[0].semilogx(eps, ranks); ax[0].set_title("soft_rank(x) vs strength")
ax[1].semilogx(eps, sorts); ax[1].set_title("soft_sort(x) vs strength")
ax[2].semilogx(eps, grads); ax[2].set_title("d soft_rank(x)[2] / dx")
for a in ax: a.set_xlabel("regularization_strength")
plt.show()'''),
    md("## Differentiable sorting networks: relaxed permutation matrices"),
    code('''fig, ax = plt.subplots(1, 4, figsize=(16, 3.5))
for a, (dist, steep) in zip(ax, [("cauchy", 2.0), ("cauchy", 20.0), ("logistic", 5.0), ("optimal", 5.0)]):
    s, perm = relax.sorting_network(x, network="odd_even", distribution=dist, steepness=steep)
    a.imshow(np.asarray(perm), cmap="viridis", vmin=0, vmax=1); a.set_title(f"{dist}, steepness {steep}")
plt.show()
s, perm = relax.sorting_network(x, network="bitonic", steepness=10.0)
print("sorted:", np.round(s, 3), " check einsum:", np.allclose(s, x @ perm, atol=1e-5))'''),
    md("## NeuralSort and SoftSort"),
    code('''fig, ax = plt.subplots(1, 3, figsize=(12, 3.5))
ax[0].imshow(np.asarray(relax.neural_sort(x, temperature=0.3))); ax[0].set_title("neural_sort, T=0.3")
ax[1].imshow(np.asarray(relax.soft_permutation(x, temperature=0.3))); ax[1].set_title("soft_permutation, T=0.3")
for t in (0.05, 0.5, 2.0):
    ax[2].plot(np.asarray(relax.neural_sort(x, temperature=t) @ x), "o-", label=f"neural_sort T={t}")
ax[2].plot(-np.sort(-np.asarray(x)), "x--", label="hard sort (desc.)"); ax[2].legend()
plt.show()'''),
    md("## Gumbel-softmax and Gumbel top-k"),
    code('''key = jax.random.PRNGKey(0)
logits = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))
temps = jnp.array([0.1, 0.5, 1.0, 5.0])
samples = jax.jit(jax.vmap(lambda t: relax.gumbel_softmax(key, logits, temperature=t)))(temps)
n = DRAWS
hard = relax.gumbel_softmax(jax.random.PRNGKey(1), jnp.broadcast_to(logits, (n, 4)), hard=True)
fig, ax = plt.subplots(1, 3, figsize=(15, 3.5))
for t, s in zip(temps, samples): ax[0].plot(s, "o-", label=f"T={float(t):g}")
ax[0].legend(); ax[0].set_title("one Gumbel-softmax sample")
ax[1].bar(np.arange(4) - 0.2, hard.mean(0), 0.4, label="hard samples"); ax[1].bar(np.arange(4) + 0.2, jax.nn.softmax(logits), 0.4, label="softmax")
ax[1].legend(); ax[1].set_title(f"frequencies over {n} draws")
v = jnp.array([0.1, 0.9, 0.5, 0.45, -0.3, 0.7])
for t in (0.1, 0.5, 2.0):
    ax[2].plot(np.asarray(relax.gumbel_topk(key, v, 3, temperature=t)), "o-", label=f"gumbel_topk T={t}")
ax[2].legend(); ax[2].set_title("top-3 masks (sum to 3)")
plt.show()'''),
    md("## Sinkhorn sort and rank, soft top-k masks, perturbed optimizers\n\nEntropic optimal transport "
       "(Cuturi et al. 2019) gives soft ranks with implicit gradients; `soft_topk_mask` is the sparse "
       "top-k of Sander et al. 2023 (exact zeros and ones) or the OT top-k of Xie et al. 2020; "
       "`perturbed_argmax` / `perturbed_topk` are the Monte-Carlo perturbed optimizers of Berthet et "
       "al. 2020 (with Gumbel noise the perturbed argmax is `softmax(x / sigma)` in expectation)."),
    code('''eps = jnp.logspace(-3, 0.5, 40)
sk_ranks = jax.jit(jax.vmap(lambda e: relax.sinkhorn_rank(x, e)))(eps)
strengths = jnp.logspace(-2, 1, 40)
sparse_masks = jax.jit(jax.vmap(lambda s: relax.soft_topk_mask(x, 3, regularization_strength=s)))(strengths)
ot_masks = jax.jit(jax.vmap(lambda e: relax.soft_topk_mask(x, 3, "ot", epsilon=e)))(eps)
fig, ax = plt.subplots(1, 4, figsize=(18, 3.5))
ax[0].semilogx(eps, sk_ranks); ax[0].set_title("sinkhorn_rank(x) vs epsilon")
ax[1].semilogx(strengths, sparse_masks); ax[1].set_title("soft_topk_mask sparse, k=3")
ax[2].semilogx(eps, ot_masks); ax[2].set_title("soft_topk_mask ot, k=3")
sig = jnp.array([0.1, 0.3, 1.0, 3.0])
pa = jnp.stack([relax.perturbed_argmax(jax.random.PRNGKey(2), x, num_samples=PERTURBED, sigma=float(s)) for s in sig])
for s, row in zip(sig, pa): ax[3].plot(np.asarray(row), "o-", label=f"sigma={float(s):g}")
ax[3].plot(np.asarray(jax.nn.softmax(x / 0.3)), "k--", label="softmax(x/0.3)"); ax[3].legend(); ax[3].set_title("perturbed_argmax")
plt.show()
for strength in (0.5, 1.0):
    mask = relax.soft_topk_mask(x, 3, regularization_strength=strength)
    g = jax.grad(lambda v: relax.soft_topk_mask(v, 3, regularization_strength=strength) @ jnp.arange(6.0))(x)
    print(f"strength {strength}: sparse top-3 mask {np.round(mask, 3)}, gradient of mask . w {np.round(g, 3)}")'''),
    md("At strength 0.5 the mask is saturated (every entry exactly 0 or 1) and its gradient is exactly "
       "zero. That is correct, not a bug: the sparse mask is the Euclidean projection of "
       "`x / strength` onto `{0 <= y <= 1, sum y = k}`, and when the gap between the k-th and "
       "(k+1)-th largest values is at least the strength, every entry sits on a face of that set, "
       "where a small change of `x` leaves the projection unchanged. Only entries strictly between 0 "
       "and 1 carry gradient (at strength 1.0 three of them do). For a gradient everywhere, raise "
       "`regularization_strength`, or use `method=\"ot\"` or `perturbed_topk`, whose masks are never "
       "exactly 0 or 1."),
    md("## Straight-through estimators"),
    code('''xs = jnp.linspace(-2, 2, 9)
print("ste_round  :", relax.ste_round(xs), " grad:", jax.grad(lambda v: relax.ste_round(v).sum())(xs))
soft = jax.nn.softmax(jnp.array([1.0, 2.0, 0.5]))
hard = jax.nn.one_hot(jnp.argmax(soft), 3)
print("straight_through value:", relax.straight_through(hard, soft))'''),
    md("## Composing operators: a differentiable 'top-k by rank' loss\n\nSoft ranks feed a Gumbel "
       "top-k mask; the gradient flows through both."),
    code('''def topk_by_rank(v, k=2):
    r = relax.soft_rank(v, regularization_strength=0.1)
    return relax.gumbel_topk(key, r, k, temperature=0.5)
g = jax.jit(jax.grad(lambda v: jnp.sum(topk_by_rank(v) * jnp.arange(v.shape[-1]))))(x)
print("mask:", np.round(topk_by_rank(x), 3)); print("grad:", np.round(g, 3))
batch = jax.random.normal(key, (8, 6))
print("vmap over a batch:", jax.vmap(topk_by_rank)(batch).shape)'''),
]

NOTEBOOKS["03_implicit_hypergradients.ipynb"] = [
    md("# Implicit hypergradients beyond NAS\n\nThe estimators of `diffnas_jax.hypergrad` work on "
       "any bilevel problem `min_h L_val(w*(h), h)` with `w*(h) = argmin_w L_train(w, h)`. Two "
       "classic examples: per-feature L2 regularization of a logistic regression (Lorraine et al., "
       "AISTATS 2020) and data re-weighting. We compare first-order, unrolled and implicit "
       "hypergradients against the exact one (a dense solve), in accuracy, time and memory."),
    install_cell("03_implicit_hypergradients.ipynb"),
    settings_cell('''INNER = knob("INNER", 300, 60)                # L-BFGS iterations of the inner problem
OUTER = knob("OUTER", 20, 3) * SCALE          # hypergradient steps on the 64 regularization strengths
REWEIGHT = knob("REWEIGHT", 15, 2) * SCALE    # hypergradient steps of the data re-weighting
TIMED = knob("TIMED", 5, 1)                   # timed calls per estimator'''),
    code('''import time
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from sklearn.datasets import load_digits
from diffnas_jax import hypergrad
jax.config.update("jax_enable_x64", True)
d = load_digits(); X = jnp.asarray(d.data / 16.0); Y = jnp.asarray(d.target)
train, val = (X[:150], Y[:150]), (X[150:700], Y[150:700])

def xent(w, x, y):
    logits = x @ w["W"] + w["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))
def train_loss(w, h, batch):          # h: log L2 strength per feature (64 hyperparameters)
    return xent(w, *batch) + 0.5 * jnp.sum(jnp.exp(h)[:, None] * w["W"] ** 2)
def val_loss(w, h, batch):
    return xent(w, *batch)

def inner_solve(h, iters=INNER):
    w = {"W": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    f = lambda w_: train_loss(w_, h, train); opt = optax.lbfgs(); s = opt.init(w)
    vg = optax.value_and_grad_from_state(f)
    def body(c, _):
        w_, s_ = c; v, g = vg(w_, state=s_); u, s_ = opt.update(g, s_, w_, value=v, grad=g, value_fn=f)
        return (optax.apply_updates(w_, u), s_), None
    return jax.lax.scan(body, (w, s), None, length=iters)[0][0]

h = jnp.full((64,), -3.0)
w_star = jax.jit(inner_solve)(h)'''),
    md("## The exact hypergradient (dense Hessian solve) and the estimators"),
    code('''from jax.flatten_util import ravel_pytree
flat, unravel = ravel_pytree(w_star)
@jax.jit  # one program: run op by op, the Hessian and Jacobian would compile each of their small ops
def exact_hypergradient(w, hh):
    H = jax.hessian(lambda v: train_loss(unravel(v), hh, train))(ravel_pytree(w)[0])
    gv = ravel_pytree(jax.grad(val_loss)(w, hh, val))[0]
    mixed = jax.jacobian(lambda h_: ravel_pytree(jax.grad(train_loss)(w, h_, train))[0])(hh)
    return -mixed.T @ jnp.linalg.solve(H, gv)  # d L_val / d h (L_val has no direct h term)
exact = exact_hypergradient(w_star, h)

estimators = {
    "first_order": hypergrad.first_order(),
    "unrolled (exact HVP)": hypergrad.unrolled(eta=0.5, hvp="exact"),
    "unrolled (finite diff.)": hypergrad.unrolled(eta=0.5, hvp="finite_difference"),
    "implicit cg, 5 it": hypergrad.implicit(solver="cg", maxiter=5),
    "implicit cg, 50 it": hypergrad.implicit(solver="cg", maxiter=50, tol=1e-10),
    "implicit normal_cg, 50 it": hypergrad.implicit(solver="normal_cg", maxiter=50, tol=1e-10),
    "implicit neumann, 50 terms": hypergrad.implicit(solver="neumann", maxiter=50, neumann_alpha=0.5),
}
rows = []
for name, est in estimators.items():
    f = jax.jit(lambda w, hh, est=est: est(train_loss, val_loss, w, hh, train, val))
    g = f(w_star, h).block_until_ready()
    t0 = time.perf_counter(); [f(w_star, h).block_until_ready() for _ in range(TIMED)]; dt = (time.perf_counter() - t0) / TIMED
    mem = f.lower(w_star, h).compile().memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    cos = float(g @ exact / (jnp.linalg.norm(g) * jnp.linalg.norm(exact) + 1e-30))
    rel = float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact))
    rows.append((name, cos, rel, dt * 1e3, temp / 1e6))
print(f"{'estimator':28s} {'cosine':>7s} {'rel.err':>8s} {'ms':>7s} {'temp MB':>8s}")
for r in rows: print(f"{r[0]:28s} {r[1]:7.3f} {r[2]:8.3g} {r[3]:7.2f} {r[4]:8.2f}")'''),
    md("First-order ignores the dependence of `w*` on `h` (here it is exactly zero: `L_val` has "
       "no direct `h` term), one unrolled step sees only a local piece of it, and the implicit "
       "estimate converges to the exact hypergradient as the solver iterates."),
    md("## Optimising 64 regularization strengths"),
    code('''est = hypergrad.implicit(solver="cg", maxiter=30, tol=1e-8)
@jax.jit
def outer(hh):
    w = inner_solve(hh); return est(train_loss, val_loss, w, hh, train, val), val_loss(w, hh, val)
opt = optax.adam(0.1); hh = h; s = opt.init(hh); losses = []
for i in range(OUTER):
    g, l = outer(hh); losses.append(float(l)); u, s = opt.update(g, s, hh); hh = optax.apply_updates(hh, u)
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
ax[0].plot(losses); ax[0].set_title("validation loss"); ax[0].set_xlabel("outer step")
ax[1].imshow(np.asarray(hh).reshape(8, 8)); ax[1].set_title("learned log-strength per pixel")
plt.show()'''),
    md("## Data re-weighting: a hypergradient per training example\n\nWith 30 % of training labels "
       "corrupted, a weight per example (sigmoid of a logit) is learned so that the trained model "
       "does well on a clean validation set; the corrupted examples get small weights."),
    code('''rng = np.random.default_rng(0)
ytr = np.asarray(train[1]).copy(); noisy = rng.random(len(ytr)) < 0.3
ytr[noisy] = rng.integers(0, 10, noisy.sum()); ytr = jnp.asarray(ytr)
def wtrain_loss(w, a, batch):
    x, y = batch; logits = x @ w["W"] + w["b"]
    per = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1)[:, 0]
    return jnp.sum(jax.nn.sigmoid(a) * per) / len(y) + 1e-3 * jnp.sum(w["W"] ** 2)
def solve_w(a, iters=INNER * 2 // 3):
    w = {"W": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    f = lambda w_: wtrain_loss(w_, a, (train[0], ytr)); opt = optax.lbfgs(); s = opt.init(w)
    vg = optax.value_and_grad_from_state(f)
    def body(c, _):
        w_, s_ = c; v, g = vg(w_, state=s_); u, s_ = opt.update(g, s_, w_, value=v, grad=g, value_fn=f)
        return (optax.apply_updates(w_, u), s_), None
    return jax.lax.scan(body, (w, s), None, length=iters)[0][0]
est = hypergrad.implicit(solver="cg", maxiter=30)
@jax.jit
def outer_rw(a):
    w = solve_w(a); return est(wtrain_loss, val_loss, w, a, (train[0], ytr), val)
a = jnp.zeros(len(ytr)); opt = optax.adam(0.3); s = opt.init(a)
for i in range(REWEIGHT):
    u, s = opt.update(outer_rw(a), s, a); a = optax.apply_updates(a, u)
wts = np.asarray(jax.nn.sigmoid(a))
plt.hist([wts[~noisy], wts[noisy]], bins=20, label=["clean", "corrupted"]); plt.legend(); plt.title("learned example weights"); plt.show()
print("mean weight clean %.3f, corrupted %.3f" % (wts[~noisy].mean(), wts[noisy].mean()))'''),
]

NOTEBOOKS["02_darts_search.ipynb"] = [
    md("# A differentiable architecture search on digits\n\nThe four axes of a search are four "
       "independent choices: a **space** (NAS-Bench-201 cell), a **relaxation** (DARTS softmax, from "
       "`diffnas_jax.mixing`), a **hypergradient estimator** (first-order; try `unrolled` or `implicit`) "
       "and a **selector** (magnitude argmax or DARTS-PT perturbation). The data are scikit-learn's "
       "handwritten digits (8x8, shipped with scikit-learn). The search runs in the library loop "
       "`diffnas_jax.search.loop.run_search`, the one `diffnas search` runs, with the same optimisers. "
       "At the end the found cell is trained from scratch beside random cells — every NAS result "
       "belongs beside random search."),
    install_cell("02_darts_search.ipynb"),
    settings_cell('''EPOCHS = knob("EPOCHS", 6, 1) * SCALE            # search epochs (11 steps of 64 images each)
CHANNELS = knob("CHANNELS", 8, 4)                  # width C of the supernet and of the trained cells
NODES = knob("NODES", 4, 3)                        # nodes of the cell (4: 6 edges, NAS-Bench-201)
OPS = knob("OPS", "none,skip_connect,nor_conv_1x1,nor_conv_3x3,avg_pool_3x3",
           "none,skip_connect,nor_conv_3x3").split(",")   # candidate ops of every edge
RANDOM_CELLS = knob("RANDOM_CELLS", 2, 1) * SCALE  # random cells trained beside the found one
EVAL_EPOCHS = knob("EVAL_EPOCHS", 2, 1) * SCALE    # from-scratch training epochs'''),
    code('''import jax, jax.numpy as jnp, numpy as np
from diffnas_jax import hypergrad, methods, mixing, select
from diffnas_jax.data import epoch_batches, load_dataset, num_batches
from diffnas_jax.spaces import nb201
from diffnas_jax.search import init_search_state, make_step
from diffnas_jax.search.driver import scaled_arch_lr
from diffnas_jax.search.loop import with_finiteness_flags
ds = load_dataset("digits", seed=0)
print(ds.summary())
space = nb201.search_space(C=CHANNELS, N=1, num_classes=ds.num_classes, max_nodes=NODES, op_names=OPS)
relaxation = mixing.softmax()                    # DARTS; try mixing.gdas(total_steps=TOTAL)
est = hypergrad.first_order()                    # try hypergrad.implicit(solver="cg", maxiter=5)
B = 64
STEPS_PER_EPOCH = min(num_batches(len(ds.y_train), B), num_batches(len(ds.y_val), B))
TOTAL = EPOCHS * STEPS_PER_EPOCH
# The optimisers `diffnas search` uses (DARTS' recipe): SGD with momentum, weight decay, gradient
# clipping and a cosine schedule on the weights; Adam on the architecture with DARTS' lr scaled to
# this search's length: 3e-4 is meant for ~20,000 steps and would leave a short search undecided.
paper = methods.get_method("darts")
method = methods.get_method("darts", epochs=EPOCHS, batch_size=B, arch_lr=scaled_arch_lr(paper, TOTAL))
print(f"{TOTAL} steps; architecture lr {method.arch_lr:.3g} (DARTS' {paper.arch_lr:g}, scaled to the search length)")
w_opt, a_opt = method.weight_optimizer(TOTAL), method.arch_optimizer()
# w_opt clips already; the finiteness flags let the loop stop at the first non-finite step
step = jax.jit(with_finiteness_flags(make_step(space, relaxation, est, w_opt, a_opt, weight_grad_clip=None)))
state = init_search_state(jax.random.key(0), space, jnp.asarray(ds.x_train[:2]), w_opt, a_opt, est)'''),
    md("## The search loop\n\n`run_search` calls the compiled step on each `(train batch, validation "
       "batch)` pair, stops with status `\"diverged\"` at the first non-finite step, and hands every "
       "finite step to callbacks (the CLI's are its log, checkpoints and progress bar). Here one callback "
       "records the mixing weights the relaxation returns and prints, once per epoch, how decided the "
       "search is: the **margin** between the chosen op's weight and the runner-up's (0: a tie, 1: one-hot) "
       "and the normalised entropy (1: uniform). Below a mean margin of 0.05 `diffnas search` warns "
       "that the search ended undecided."),
    code('''from diffnas_jax.search.decision import summarize_decisions
from diffnas_jax.search.loop import run_search

def batches():  # (train batch, val batch) pairs; the order is a pure function of (seed, epoch)
    for epoch in range(EPOCHS):
        yield from zip(epoch_batches(ds.x_train, ds.y_train, B, seed=0, epoch=2 * epoch),
                       epoch_batches(ds.x_val, ds.y_val, B, seed=0, epoch=2 * epoch + 1))

history = []
def record(info):  # after every finite step: the mix the relaxation returns, and a line per epoch
    history.append(np.asarray(relaxation(info.state.arch, jax.random.key(0), info.step)["cell"]))
    if info.step % STEPS_PER_EPOCH == 0:
        m, d = info.metrics, summarize_decisions({"cell": history[-1]})
        print(f"epoch {info.step // STEPS_PER_EPOCH}: train acc {m['train_acc']:.3f}  val acc {m['val_acc']:.3f}  "
              f"mean margin {d['mean_margin']:.3f}  entropy {d['mean_entropy']:.3f}")

result = run_search(lambda st, batch, i: step(st, *batch), state, batches(), callbacks=[record])
if result.status != "complete":
    raise RuntimeError(result.divergence.message())
state = result.state'''),
    md("## Mixing weights of every edge over the search"),
    code('''%matplotlib inline
# (the inline backend shows the Figures the library returns; it never switches your backend)
from diffnas_jax.viz import plot_arch_history, plot_genotype
# the space names the panels (its edges, "1<-0" = node 1 from node 0) and the ops; the y-axis is a
# fixed [0, 1] with the uniform level dashed, so a search that has not decided looks flat
display(plot_arch_history(np.arange(1, len(history) + 1), {"cell": np.stack(history)}, space=space))'''),
    md("## The derived cell: magnitude and perturbation-based selection"),
    code('''genotype = select.argmax(space, state.arch)
print("argmax      :", genotype)
xva, yva = jnp.asarray(ds.x_val), jnp.asarray(ds.y_val)
val_batches = [(xva[i:i + 256], yva[i:i + 256]) for i in range(0, 512, 256)]
pt_result = select.perturbation(space, state.weights, state.model_state, state.arch, relaxation, val_batches, train=True)
print("DARTS-PT    :", pt_result.genotype)
display(plot_genotype(genotype, title="argmax cell"))  # a Figure; plot_genotype(g, "cell.png") also saves it'''),
    md("## Train the found cell from scratch beside random cells"),
    code('''from diffnas_jax.search.evaluate import EvalConfig, train_and_evaluate, random_genotypes
cfg = EvalConfig(space="nb201", epochs=EVAL_EPOCHS, channels=CHANNELS)
found = train_and_evaluate(genotype, cfg, ds)
rand = [train_and_evaluate(g, cfg, ds)
        for g in random_genotypes("nb201", RANDOM_CELLS, seed=1, max_nodes=NODES, op_names=OPS)]
print(f"searched {found['test_accuracy']:.4f}  ({found['params']} params)  {genotype}")
for r in rand: print(f"random   {r['test_accuracy']:.4f}  ({r['params']} params)  {r['genotype']}")'''),
    md("Read this comparison with care: two training epochs and 359 test images (one image is "
       "0.28 points) separate little, and on digits a searched cell is not clearly better than "
       "random cells even with 30 training epochs and several seeds (the README's quality table, "
       "from `benchmarks/digits_quality.py`). The search's mean margin also stays modest (about "
       "0.1 after 66 steps): `diffnas search` reports it in `result.json` and warns below 0.05."),
]

NOTEBOOKS["04_hardware_aware.ipynb"] = [
    md("# Hardware-aware search: accuracy against cost\n\nThe MobileNetV2 layer-wise space "
       "(FBNet, Wu et al. 2019; ProxylessNAS, Cai et al. 2019): per layer an MBConv with kernel "
       "{3, 5} and expansion {3, 6}, or skip. The expected cost of the relaxed architecture "
       "(`diffnas_jax.cost.expected_cost`) is linear in the mixing weights, so it can join the "
       "architecture loss (`diffnas_jax.regularizers`): ProxylessNAS adds `lambda * E[cost]`, "
       "Single-Path NAS `lambda * log E[cost]`, FBNet multiplies `CE * a * log(cost)^b`. Sweeping "
       "`lambda` traces the trade-off; each search runs in the library loop "
       "`diffnas_jax.search.loop.run_search`."),
    install_cell("04_hardware_aware.ipynb"),
    settings_cell('''STEPS = knob("STEPS", 40, 3) * SCALE                     # search steps per lambda
LAMBDAS = [float(v) for v in knob("LAMBDAS", "0.0,0.05,0.3,1.0", "0.0,1.0").split(",")]  # penalties swept
# the searchable layers (the quick run: two layers, one kernel size)
LAYERS = (dict(widths=(16, 16, 24, 24), strides=(1, 1, 2, 1), kernel_sizes=(3, 5)) if not QUICK
          else dict(widths=(8, 16), strides=(1, 2), kernel_sizes=(3,)))'''),
    code('''import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from diffnas_jax import cost, hypergrad, mixing, regularizers
from diffnas_jax.data import load_dataset
from diffnas_jax.spaces import mbconv
from diffnas_jax.search import init_search_state, make_step
from diffnas_jax.search.loop import run_search, with_finiteness_flags
from diffnas_jax.search.objective import standard
ds = load_dataset("digits", seed=0)
xtr, ytr, xva, yva = map(jnp.asarray, (ds.x_train, ds.y_train, ds.x_val, ds.y_val))
# a small MBConv space for 8x8 digits (the default suits 32x32 CIFAR images)
space = mbconv.search_space(num_classes=ds.num_classes, expansions=(3, 6), stem_width=8, first_width=16,
                            head_width=64, **LAYERS)
table = cost.cost_table(space, input_shape=ds.image_shape, metric="flops")
print(space.op_names, "layers:", space.num_layers, "| cost unit:", table.unit)'''),
    md("## The three loss forms as functions of the expected cost"),
    code('''c = jnp.linspace(1.5, 40, 200); ce = 1.0
for name, f in [("FBNet CE*a*log(c)^b", regularizers.fbnet_loss()), ("ProxylessNAS CE+l*c", regularizers.proxyless_loss(0.02)),
                ("Single-Path CE+l*log(c)", regularizers.single_path_loss(0.2))]:
    plt.plot(c, jax.vmap(lambda cc: f(ce, cc))(c), label=name)
plt.xlabel("expected cost (MMAC)"); plt.ylabel("loss at CE = 1"); plt.legend(); plt.show()'''),
    md("## A sweep of the ProxylessNAS penalty\n\nThe penalty enters through the step's objective "
       "(`standard(regularizer=...)`: cross-entropy plus a term on the architecture loss). With "
       "`lambda` an argument of the compiled step, the whole sweep compiles once. Adam on the weights "
       "(instead of the CLI's SGD with a cosine schedule) gets a useful supernet in a few dozen steps."),
    code('''relaxation, est = mixing.softmax(), hypergrad.first_order()
w_opt, a_opt = optax.adam(3e-3), optax.adam(3e-2)
SCALE_MMAC = 1e-6  # MACs -> MMACs

@jax.jit
def step(st, bt, bv, lam):
    penalty = lambda arch, mix, s: lam * SCALE_MMAC * cost.expected_cost(space, mix, table)
    search_step = make_step(space, relaxation, est, w_opt, a_opt, objective=standard(regularizer=penalty))
    return with_finiteness_flags(search_step)(st, bt, bv)

def batches(seed):  # random (train, val) batches of 64
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        it, iv = rng.integers(0, len(ytr), 64), rng.integers(0, len(yva), 64)
        yield (xtr[it], ytr[it]), (xva[iv], yva[iv])

def search(lam, seed=0):
    st = init_search_state(jax.random.key(seed), space, xtr[:2], w_opt, a_opt, est)
    res = run_search(lambda s, batch, i: step(s, *batch, jnp.float32(lam)), st, batches(seed))
    if res.status != "complete":
        raise RuntimeError(res.divergence.message())
    mix = relaxation(res.state.arch, jax.random.key(0), res.step)
    return (space.genotype(res.state.arch), float(res.metrics["val_acc"]),
            float(SCALE_MMAC * cost.expected_cost(space, mix, table)))
results = {lam: search(lam) for lam in LAMBDAS}
for lam, (g, acc, ec) in results.items(): print(f"lambda {lam:<5} val acc {acc:.3f}  E[cost] {ec:.2f} MMAC  {g}")'''),
    code('''accs = [r[1] for r in results.values()]; costs = [r[2] for r in results.values()]
plt.plot(costs, accs, "o-")
for lam, x, y in zip(results, costs, accs): plt.annotate(f"lambda={lam}", (x, y))
plt.xlabel("expected cost of the searched architecture (MMAC)"); plt.ylabel("supernet val accuracy")
plt.title("accuracy-cost trade-off (ProxylessNAS additive form)"); plt.show()'''),
]


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        for i, cell in enumerate(cells):
            cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating leaves unchanged cells unchanged
        nb.cells = cells
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["colab"] = {"provenance": []}
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
