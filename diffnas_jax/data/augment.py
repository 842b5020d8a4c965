"""Jittable image augmentation with explicit PRNG keys (NHWC batches)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop_flip(key: jax.Array, x: jax.Array, padding: int = 4, flip: bool = True) -> jax.Array:
    """Zero-pad by ``padding`` and take a random crop of the original size, then flip horizontally
    with probability 1/2 (the CIFAR-10 augmentation of He et al. 2016 used by DARTS).

    Args:
      key: PRNG key.
      x: ``(N, H, W, C)`` images.
      padding: pixels of zero padding on each side (0 disables cropping).
      flip: whether to apply random horizontal flips.

    Returns:
      ``(N, H, W, C)`` of ``x``'s dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"`x` must be NHWC, got shape {x.shape}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"`padding` must be a non-negative int, got {padding!r}")
    n, h, w, c = x.shape
    k_crop, k_flip = jax.random.split(key)
    if padding:
        xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offs = jax.random.randint(k_crop, (n, 2), 0, 2 * padding + 1)
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))  # noqa: E731
        x = jax.vmap(crop)(xp, offs)
    if flip:
        do = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        x = jnp.where(do, x[:, :, ::-1, :], x)
    return x


def cutout(key: jax.Array, x: jax.Array, size: int) -> jax.Array:
    """Zero a ``size x size`` square at a random centre of each image (DeVries & Taylor 2017;
    the square is clipped at the border, as in the DARTS evaluation code).

    Args:
      key: PRNG key.
      x: ``(N, H, W, C)`` images.
      size: side of the square (0 returns ``x``).
    """
    if x.ndim != 4:
        raise ValueError(f"`x` must be NHWC, got shape {x.shape}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"`size` must be a non-negative int, got {size!r}")
    if size == 0:
        return x
    n, h, w, _ = x.shape
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (n, 1, 1), 0, h)
    cx = jax.random.randint(kx, (n, 1, 1), 0, w)
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    half = size // 2
    inside = (rows >= cy - half) & (rows < cy - half + size) & (cols >= cx - half) & (cols < cx - half + size)
    return jnp.where(inside[..., None], jnp.zeros((), x.dtype), x)
