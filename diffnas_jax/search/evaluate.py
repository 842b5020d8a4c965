"""Train a discrete architecture from scratch and report test accuracy, parameters and FLOPs.

The protocol is the same for a searched genotype and for random ones (``diffnas baseline``), so
results are comparable ("NAS evaluation is frustratingly hard", Yang, Esperança & Carlucci, ICLR
2020): the network is trained on train + validation (the two search splits), with SGD (Nesterov
momentum 0.9, weight decay 5e-4, cosine learning rate, as the NAS-Bench-201 training recipe,
Dong & Yang 2020), random-crop augmentation (flips where the dataset allows; cutout and linearly
increasing drop-path for DARTS networks, as the DARTS evaluation script), then tested once on
the held-out test split with BatchNorm running statistics.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax.spaces import registry
from diffnas_jax.spaces.base import EvalNetwork
from diffnas_jax.spaces.genotypes import genotype_text
from .native_log import xla_log_to_debug

__all__ = ["EvalConfig", "make_eval_network", "train_and_evaluate", "count_flops",
           "random_genotypes"]

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The from-scratch training protocol.

    Attributes:
      space: a name of :func:`diffnas_jax.spaces.registry.list_spaces` (how to read the genotype).
      dataset, data_dir, data_seed: the data (same split as the search).
      epochs, batch_size, lr, momentum, weight_decay, grad_clip: SGD with a cosine schedule.
      seed: initialisation and data-order seed.
      channels, layers: network size (``None``: the space's evaluation preset in
        :mod:`diffnas_jax.spaces.registry`).
      augment: random crop (+ flip when the dataset allows).
      cutout: cutout square side (0: off; ``None``: 16 for 32x32 images, else 0).
      drop_path_prob: increased linearly over training; only for networks that take it (DARTS):
        a positive value for another space is a ``ValueError``.
    """

    space: str = "nb201"
    dataset: str = "digits"
    data_dir: str | None = None
    data_seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 5.0
    seed: int = 0
    channels: int | None = None
    layers: int | None = None
    augment: bool = True
    cutout: int | None = None
    drop_path_prob: float = 0.0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be positive, got {self.lr!r}")


def make_eval_network(space: str, genotype: Any, num_classes: int, *, channels: int | None = None,
                      layers: int | None = None, drop_path_prob: float = 0.0) -> EvalNetwork:
    """The discrete network of ``genotype`` in the registered space ``space``
    (:func:`diffnas_jax.spaces.registry.make_eval_network`); ``drop_path_prob`` is passed only
    when positive, so a space without drop-path rejects it instead of ignoring it."""
    size = {"drop_path_prob": drop_path_prob} if drop_path_prob > 0 else {}
    return registry.make_eval_network(space, genotype, num_classes, channels=channels, layers=layers, **size)


def count_flops(net: EvalNetwork, weights: Any, state: Any, image_shape: tuple[int, ...]) -> float:
    """Floating-point operations of one image's forward pass, from XLA's cost analysis of the
    lowered (not compiled) program; a multiply-add counts as 2."""
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    lowered = jax.jit(lambda w, s, xx: net.apply(w, s, None, xx, False)[0]).lower(weights, state, x)
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def random_genotypes(space: str, num: int, seed: int, num_classes: int = 10, **space_kwargs: Any) -> list[Any]:
    """``num`` uniformly random genotypes of ``space`` (distinct when the space allows)."""
    sp = registry.make_space(space, num_classes, **space_kwargs)
    key = jax.random.key(seed)
    out, seen = [], set()
    tries = 0
    while len(out) < num:
        key, k = jax.random.split(key)
        g = sp.random_genotype(k)
        tries += 1
        if str(g) in seen and tries < 100 * num:
            continue
        seen.add(str(g))
        out.append(g)
    return out


def _logits(out: Any) -> jax.Array:
    return out[0] if isinstance(out, tuple) else out


def train_and_evaluate(genotype: Any, config: EvalConfig, dataset: Any = None, *, progress: bool = False,
                       desc: str = "evaluate") -> dict:
    """Train ``genotype``'s network from scratch on train + val and test it.

    Args:
      genotype: NB201 arch string, DARTS ``Genotype`` (or its text form / a built-in name), or a
        genotype of another space with an ``eval_network``.
      config: the :class:`EvalConfig`.
      dataset: a preloaded :class:`diffnas_jax.data.Dataset` (default: ``config.dataset``).
      progress: show a tqdm bar.

    Returns:
      ``{"genotype", "test_accuracy", "params", "flops", "train_accuracy", "train_time_s",
      "config"}``.
    """
    import optax

    from diffnas_jax.data import cutout as cutout_fn
    from diffnas_jax.data import epoch_batches, load_dataset, num_batches, random_crop_flip

    from .logging import to_jsonable

    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.data_seed)
    net = make_eval_network(config.space, genotype, dataset.num_classes, channels=config.channels,
                            layers=config.layers, drop_path_prob=config.drop_path_prob)
    x_tr, y_tr = dataset.train_plus_val()
    spe = num_batches(len(y_tr), config.batch_size)
    total = spe * config.epochs
    schedule = optax.cosine_decay_schedule(config.lr, total)
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=True))
    key = jax.random.key(config.seed)
    weights, state = jax.jit(net.init)(jax.random.fold_in(key, 0), jnp.asarray(x_tr[:2]))
    opt_state = tx.init(weights)
    h = dataset.image_shape[0]
    pad = max(1, h // 8)
    cut = (16 if h == 32 else 0) if config.cutout is None else config.cutout
    use_dp = config.drop_path_prob > 0  # make_eval_network refused it where the network has no drop-path

    def loss_fn(w, s, x, y, k, progress_frac):
        kw = {"drop_path_prob": config.drop_path_prob * progress_frac} if use_dp else {}
        out, s2 = net.apply(w, s, None, x, True, rng=k, **kw)
        logits = _logits(out)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (s2, jnp.mean(jnp.argmax(logits, -1) == y))

    @jax.jit
    def train_step(w, s, o, x, y, k, step):
        k_aug, k_cut, k_net = jax.random.split(k, 3)
        if config.augment:
            x = random_crop_flip(k_aug, x, pad, bool(dataset.flip))
        if cut:
            x = cutout_fn(k_cut, x, cut)
        (loss, (s2, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(w, s, x, y, k_net, step / total)
        upd, o2 = tx.update(g, o, w)
        return optax.apply_updates(w, upd), s2, o2, loss, acc

    @jax.jit
    def predict(w, s, x):
        return jnp.argmax(_logits(net.apply(w, s, None, x, False)[0]), -1)

    # compile before the bar and the clock start, so the ETA and train_time count steps only
    xb0, yb0 = next(epoch_batches(x_tr, y_tr, config.batch_size, seed=config.seed, epoch=0))
    t_compile = time.time()
    lowered = train_step.lower(weights, state, opt_state, xb0, yb0, jax.random.fold_in(key, 1), 0)
    with xla_log_to_debug():
        train_step = lowered.compile()
    if progress:
        print(f"compiling the training step (first run only; cached afterwards) ... "
              f"{time.time() - t_compile:.1f} s", file=sys.stderr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)
    t0 = time.time()
    step = 0
    accs = []
    for epoch in range(config.epochs):
        accs = []
        for xb, yb in epoch_batches(x_tr, y_tr, config.batch_size, seed=config.seed, epoch=epoch):
            weights, state, opt_state, loss, acc = train_step(weights, state, opt_state, xb, yb,
                                                              jax.random.fold_in(key, step + 1), step)
            step += 1
            accs.append(acc)
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss):.3g}", refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()
    train_time = time.time() - t0
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"training of {genotype} diverged (loss {float(loss)})")
    # fixed-size test chunks (the last one padded) so the predictor compiles once
    chunk = min(500, len(dataset.y_test))
    n = len(dataset.y_test)
    correct = 0
    for i in range(0, n, chunk):
        xb = dataset.x_test[i:i + chunk]
        m = len(xb)
        if m < chunk:
            xb = np.concatenate([xb, np.zeros((chunk - m,) + xb.shape[1:], xb.dtype)])
        pred = np.asarray(predict(weights, state, xb))[:m]
        correct += int((pred == dataset.y_test[i:i + m]).sum())
    params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(weights)))
    return {
        "genotype": genotype_text(genotype),
        "test_accuracy": correct / n,
        "train_accuracy": float(np.mean([float(a) for a in accs])) if accs else float("nan"),
        "params": params,
        "flops": count_flops(net, weights, state, dataset.image_shape),
        "train_time_s": round(train_time, 2),
        "dataset": dataset.summary(),
        "config": to_jsonable(dataclasses.asdict(config)),
    }


def __getattr__(name: str) -> Any:
    if name == "EVAL_PRESETS":
        import warnings

        warnings.warn("diffnas_jax.search.evaluate.EVAL_PRESETS is deprecated: use "
                      "diffnas_jax.spaces.registry.eval_preset(name)", DeprecationWarning, stacklevel=2)
        return {n: registry.eval_preset(n) for n in registry.list_spaces()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
