"""MobileNetV2-style layer-wise search space for hardware-aware NAS (FBNet: Wu et al., CVPR 2019;
ProxylessNAS: Cai, Zhu & Han, ICLR 2019), built from MobileNetV2 inverted residual blocks
(Sandler et al., CVPR 2018).

Network (NHWC)::

    stem     Conv3x3(stem_width, stride stem_stride) - BN - ReLU6
    first    depthwise 3x3 - BN - ReLU6 - 1x1 project(first_width) - BN        (MobileNetV2 t=1 block)
    layer i  searchable: candidates MBConv(k, e) for k in kernel_sizes, e in expansions, and skip
    head     1x1 Conv(head_width) - BN - ReLU6 - global average pool - Linear(num_classes)

``MBConv(k, e)`` with ``c_in`` input and ``c_out`` output channels: 1x1 expand to ``e * c_in`` -
BN - ReLU6 - depthwise ``k x k`` (stride of the layer) - BN - ReLU6 - 1x1 project - BN, plus the
input when the stride is 1 and ``c_in == c_out`` (identity residual).

**Skip** (identity) is a candidate only in the layers whose output shape equals their input
shape (stride 1 and ``c_in == c_out``); with the default configuration those are layers 1, 3
and 5 (:attr:`MBConvSpace.skip_allowed`). In the other layers the ``skip`` column of the arch
array is inert: ``init_arch`` and ``arch_from_genotype`` give it the logit
:data:`MASKED_LOGIT` (so every relaxation puts ~0 mass there), ``apply`` ignores its mixing
weight and ``genotype`` never picks it. :attr:`MBConvSpace.op_mask` is the boolean mask.

A mixed layer computes ``sum_k mix[k] * candidate_k(x)`` (each MBConv with its own residual, as
in FBNet's super net; with weights summing to one this equals ProxylessNAS's
``x + sum_k mix[k] * op_k(x)`` with a zero op in place of skip).

The default configuration suits 32x32 inputs (CIFAR; 8x8 scikit-learn digits work too, the
spatial size must be at least the total stride). All candidates of a layer run as one wide
computation: one 1x1 expansion over the concatenated expansion kernels, one depthwise
convolution (the shifted-multiply form of :func:`diffnas_jax.spaces.layers.depthwise_conv`;
smaller kernels zero-padded to the largest, which gives the same output), one BatchNorm per
stage over all candidates' channels — BatchNorm is per channel, so this equals separate
candidates.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax._checks import check_int_in_range
from diffnas_jax.spaces.base import SpaceDefaults, check_mix_matches, check_size_kwargs, leaf_candidates, leaf_key
from diffnas_jax.spaces.layers import (BatchNorm2d, Conv2d, DepthwiseConv2d, Linear, PointwiseConv2d, batch_norm,
                                       conv_out_size, depthwise_conv, global_avg_pool, pointwise_conv,
                                       torch_uniform_init)
from diffnas_jax.spaces import scaffold

__all__ = ["MBConvSpace", "MBConvEvalNetwork", "search_space", "eval_network", "op_name", "parse_op",
           "MASKED_LOGIT", "DEFAULT_WIDTHS", "DEFAULT_STRIDES"]

PyTree = Any

#: logit given to candidates a layer does not have (skip where the shape changes)
MASKED_LOGIT = -30.0
DEFAULT_WIDTHS = (24, 24, 32, 32, 64, 64)
DEFAULT_STRIDES = (1, 1, 2, 1, 2, 1)
SKIP = "skip"


def op_name(kernel: int, expansion: int) -> str:
    """``"mbconv_k{kernel}_e{expansion}"``."""
    return f"mbconv_k{kernel}_e{expansion}"


def parse_op(name: str) -> tuple[int, int] | None:
    """``(kernel, expansion)`` of an MBConv op name; ``None`` for ``"skip"``."""
    if name == SKIP:
        return None
    try:
        _, k, e = name.split("_")
        if not (k.startswith("k") and e.startswith("e")):
            raise ValueError
        return int(k[1:]), int(e[1:])
    except ValueError:
        raise ValueError(f"unknown op {name!r}: expected 'mbconv_k<kernel>_e<expansion>' or 'skip'") from None


def _relu6(x):
    return jnp.clip(x, 0, 6)


_STAGES = ("expand", "dw", "project")


def _candidate_init(c_in: int, c_out: int, k: int, e: int):
    """PyTorch default init of one MBConv candidate's weights."""
    hidden = c_in * e

    def init(key, dtype):
        k1, k2, k3 = jax.random.split(key, 3)
        sdt = jnp.promote_types(dtype, jnp.float32)
        bn = lambda c: {"scale": jnp.ones((c,), sdt), "bias": jnp.zeros((c,), sdt)}  # noqa: E731
        return {"expand": {"kernel": torch_uniform_init(c_in)(k1, (1, 1, c_in, hidden), dtype)},
                "expand_bn": bn(hidden),
                "dw": {"kernel": torch_uniform_init(k * k)(k2, (k, k, 1, hidden), dtype)}, "dw_bn": bn(hidden),
                "project": {"kernel": torch_uniform_init(hidden)(k3, (1, 1, hidden, c_out), dtype)},
                "project_bn": bn(c_out)}

    return init


class MixedMBConvLayer(nn.Module):
    """One searchable layer: ``sum_k w[k] * op_k(x)`` over ``ops`` (MBConv names and/or
    ``"skip"``); ``w=None`` (a discrete network) needs exactly one op and applies it alone.

    Parameters and BN state are stored per candidate under its op name (``expand``, ``dw``,
    ``project`` kernels and ``*_bn``), so a discrete network holds the same subtrees as the
    supernet (weight inheritance is a dictionary lookup)."""

    features: int
    stride: int
    ops: tuple[str, ...]
    momentum: float = 0.1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, w: jax.Array | None, train: bool) -> jax.Array:
        c_in, c_out = x.shape[-1], self.features
        cands = [(n, *parse_op(n)) for n in self.ops if n != SKIP]
        sdt = jnp.promote_types(x.dtype, jnp.float32)
        params, stats = {}, {}
        for name, k, e in cands:
            params[name] = self.param(name, _candidate_init(c_in, c_out, k, e), x.dtype)
            stats[name] = self.variable("batch_stats", name, lambda e=e: {
                f"{s}_bn": {"mean": jnp.zeros((c,), sdt), "var": jnp.ones((c,), sdt),
                            "num_batches_tracked": jnp.zeros((), jnp.int32)}
                for s, c in (("expand", c_in * e), ("dw", c_in * e), ("project", c_out))})
        update = train and not self.is_initializing() and self.is_mutable_collection("batch_stats")
        outs = {}
        if cands:
            widths = [c_in * e for _, _, e in cands]
            splits = np.cumsum(widths)[:-1].tolist()

            def bn_stage(y, stage, sizes):
                names = [n for n, _, _ in cands]
                cat = lambda f: jnp.concatenate([f(n) for n in names])  # noqa: E731
                y, new = batch_norm(y, cat(lambda n: stats[n].value[f"{stage}_bn"]["mean"]),
                                    cat(lambda n: stats[n].value[f"{stage}_bn"]["var"]),
                                    cat(lambda n: params[n][f"{stage}_bn"]["scale"]),
                                    cat(lambda n: params[n][f"{stage}_bn"]["bias"]), train, self.momentum, self.eps)
                if update:
                    off = 0
                    for n, size in zip(names, sizes):
                        old = stats[n].value
                        st = old[f"{stage}_bn"]
                        stats[n].value = {**old, f"{stage}_bn": {
                            "mean": new[0][off:off + size], "var": new[1][off:off + size],
                            "num_batches_tracked": st["num_batches_tracked"] + 1}}
                        off += size
                return y

            kern = jnp.concatenate([params[n]["expand"]["kernel"] for n, _, _ in cands], axis=-1)
            h = _relu6(bn_stage(pointwise_conv(x, kern), "expand", widths))
            kmax = max(k for _, k, _ in cands)
            dw = jnp.concatenate([jnp.pad(params[n]["dw"]["kernel"], [((kmax - k) // 2,) * 2] * 2 + [(0, 0)] * 2)
                                  for n, k, _ in cands], axis=-1)
            h = _relu6(bn_stage(depthwise_conv(h, dw, self.stride, kmax // 2), "dw", widths))
            parts = jnp.split(h, splits, axis=-1) if splits else [h]
            y = jnp.concatenate([pointwise_conv(p, params[n]["project"]["kernel"])
                                 for p, (n, _, _) in zip(parts, cands)], axis=-1)
            y = bn_stage(y, "project", [c_out] * len(cands))
            residual = self.stride == 1 and c_in == c_out
            for i, (n, _, _) in enumerate(cands):
                yi = y[..., i * c_out:(i + 1) * c_out]
                outs[n] = yi + x if residual else yi
        if SKIP in self.ops:
            if self.stride != 1 or c_in != c_out:
                raise ValueError(f"skip is not possible in a layer with stride {self.stride} from {c_in} to "
                                 f"{c_out} channels")
            outs[SKIP] = x
        if w is None:
            if len(self.ops) != 1:
                raise ValueError(f"a discrete layer needs exactly one op, got {self.ops}")
            return outs[self.ops[0]]
        total = None
        for i, n in enumerate(self.ops):
            term = outs[n] * w[i]
            total = term if total is None else total + term
        return total


@dataclasses.dataclass(frozen=True)
class _Config:
    num_classes: int
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    kernel_sizes: tuple[int, ...]
    expansions: tuple[int, ...]
    allow_skip: bool
    stem_width: int
    stem_stride: int
    first_width: int
    head_width: int

    @property
    def op_names(self) -> tuple[str, ...]:
        ops = tuple(op_name(k, e) for k in self.kernel_sizes for e in self.expansions)
        return ops + ((SKIP,) if self.allow_skip else ())

    @property
    def num_layers(self) -> int:
        return len(self.widths)

    @property
    def in_widths(self) -> tuple[int, ...]:
        return (self.first_width,) + tuple(self.widths[:-1])

    @property
    def skip_allowed(self) -> tuple[bool, ...]:
        return tuple(self.allow_skip and s == 1 and ci == co
                     for s, ci, co in zip(self.strides, self.in_widths, self.widths))

    @property
    def op_mask(self) -> np.ndarray:
        """``(num_layers, num_ops)`` booleans: which candidates each layer has."""
        m = np.ones((self.num_layers, len(self.op_names)), bool)
        if self.allow_skip:
            m[:, -1] = self.skip_allowed
        return m

    @property
    def total_stride(self) -> int:
        return int(self.stem_stride * np.prod(self.strides))


class MBConvNetwork(nn.Module):
    """The network; ``layer_ops[i]`` are the candidates of layer ``i`` (all allowed ops in the
    supernet, one op in a discrete network). Input NHWC, output logits ``(B, num_classes)``."""

    config: _Config
    layer_ops: tuple[tuple[str, ...], ...]

    @nn.compact
    def __call__(self, x: jax.Array, mix: jax.Array | None, train: bool) -> jax.Array:
        cfg = self.config
        h = Conv2d(cfg.stem_width, 3, cfg.stem_stride, 1, name="stem_conv")(x)
        h = _relu6(BatchNorm2d(name="stem_bn")(h, train))
        h = _relu6(BatchNorm2d(name="first_dw_bn")(DepthwiseConv2d(3, 1, 1, name="first_dw")(h), train))
        h = BatchNorm2d(name="first_pw_bn")(PointwiseConv2d(cfg.first_width, name="first_pw")(h), train)
        names = cfg.op_names
        for i, ops in enumerate(self.layer_ops):
            w = None
            if mix is not None:
                w = mix[i, np.array([names.index(o) for o in ops])]
            h = MixedMBConvLayer(cfg.widths[i], cfg.strides[i], ops, name=f"layers_{i}")(h, w, train)
        h = _relu6(BatchNorm2d(name="head_bn")(PointwiseConv2d(cfg.head_width, name="head_conv")(h), train))
        return Linear(cfg.num_classes, name="classifier")(global_avg_pool(h))


def _check_input(x: Any, cfg: _Config, where: str) -> jax.Array:
    return scaffold.check_nhwc(x, where, min_size=cfg.total_stride,
                               why=f"the network's total stride {cfg.total_stride} (stem_stride x strides)")


class _Base:
    config: _Config

    def _dummy_mix(self, dtype):
        return None

    def init(self, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
        """Weights (``params``) and BatchNorm state (``batch_stats``) for NHWC inputs like ``x``
        (PyTorch default initialisation)."""
        x = _check_input(x, self.config, f"{self._where}.init")
        return scaffold.flax_init(lambda k: self.module.init(k, x, self._dummy_mix(x.dtype), False), key)

    def _run(self, weights, state, mix, x, train):
        return scaffold.flax_apply(self.module, weights, state, x, mix, bool(train), update_state=bool(train))

    def num_params(self, weights: PyTree) -> int:
        return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(weights)))

    # -- cost metadata -------------------------------------------------------------------------
    def layer_specs(self, input_shape: Sequence[int] = (32, 32, 3)) -> list[dict]:
        """Per searchable layer: ``in_shape`` / ``out_shape`` ``(H, W, C)``, ``stride``,
        ``skip_allowed`` and ``candidates`` (one dict per op of :attr:`op_names`: ``op``,
        ``kernel``, ``expansion`` (``None`` for skip), ``allowed``, ``flops`` (multiply-adds)
        and ``params``), for FLOPs / parameter / latency look-up tables."""
        return _layer_specs(self.config, input_shape)

    def layer_cost_arrays(self, input_shape: Sequence[int] = (32, 32, 3)) -> dict[str, np.ndarray]:
        """``{"flops", "params"}`` arrays ``(num_layers, num_ops)`` (0 for skip and for masked
        candidates) and the fixed parts ``"base_flops"``, ``"base_params"`` (stem, first block,
        head, classifier): the expected cost of a relaxed architecture is
        ``base + sum(mix * table)`` (FBNet / ProxylessNAS cost losses)."""
        specs = _layer_specs(self.config, input_shape)
        flops = np.array([[c["flops"] if c["allowed"] else 0 for c in s["candidates"]] for s in specs], np.float64)
        params = np.array([[c["params"] if c["allowed"] else 0 for c in s["candidates"]] for s in specs], np.float64)
        bf, bp = _base_cost(self.config, input_shape, specs)
        return {"flops": flops, "params": params, "base_flops": bf, "base_params": bp}

    def count_flops_params(self, genotype: Sequence[str], input_shape: Sequence[int] = (32, 32, 3)) -> dict[str, int]:
        """Multiply-adds (conv and linear layers, per image) and trainable parameters of the
        discrete network of ``genotype`` (BN scale/shift included, running statistics not)."""
        genotype = _check_genotype(self.config, genotype)
        specs = _layer_specs(self.config, input_shape)
        names = self.config.op_names
        flops, params = _base_cost(self.config, input_shape, specs)
        for s, op in zip(specs, genotype):
            c = s["candidates"][names.index(op)]
            flops += c["flops"]
            params += c["params"]
        return {"flops": int(flops), "params": int(params)}

    def from_reference(self, state_dict, *args, **kwargs):
        raise NotImplementedError(
            "mbconv: no reference PyTorch implementation (and no fixture) is bundled for this space, so "
            "there is no state_dict layout to import; initialise with `init` instead")

    def to_reference(self, weights, state):
        raise NotImplementedError("mbconv: no reference PyTorch state_dict layout exists for this space")


def _layer_specs(cfg: _Config, input_shape: Sequence[int]) -> list[dict]:
    if len(input_shape) != 3:
        raise ValueError(f"`input_shape` must be (H, W, C), got {tuple(input_shape)}")
    h, w = conv_out_size(input_shape[0], 3, cfg.stem_stride, 1), conv_out_size(input_shape[1], 3, cfg.stem_stride, 1)
    out, mask = [], cfg.op_mask
    for i, (c_in, c_out, s) in enumerate(zip(cfg.in_widths, cfg.widths, cfg.strides)):
        cands = []
        for j, name in enumerate(cfg.op_names):
            ke = parse_op(name)
            if ke is None:
                cands.append(dict(op=name, kernel=None, expansion=None, allowed=bool(mask[i, j]), flops=0, params=0))
                continue
            k, e = ke
            hid = c_in * e
            ho, wo = conv_out_size(h, k, s, k // 2), conv_out_size(w, k, s, k // 2)
            flops = h * w * c_in * hid + ho * wo * hid * k * k + ho * wo * hid * c_out
            params = c_in * hid + 2 * hid + k * k * hid + 2 * hid + hid * c_out + 2 * c_out
            cands.append(dict(op=name, kernel=k, expansion=e, allowed=bool(mask[i, j]), flops=flops, params=params))
        ho, wo = conv_out_size(h, 3, s, 1), conv_out_size(w, 3, s, 1)
        out.append(dict(index=i, in_shape=(h, w, c_in), out_shape=(ho, wo, c_out), stride=s,
                        skip_allowed=cfg.skip_allowed[i], candidates=cands))
        h, w = ho, wo
    return out


def _base_cost(cfg: _Config, input_shape, specs) -> tuple[float, float]:
    h, w, c = input_shape
    hs, ws = conv_out_size(h, 3, cfg.stem_stride, 1), conv_out_size(w, 3, cfg.stem_stride, 1)
    sw, fw, hw = cfg.stem_width, cfg.first_width, cfg.head_width
    flops = hs * ws * c * 9 * sw + hs * ws * sw * 9 + hs * ws * sw * fw
    params = c * 9 * sw + 2 * sw + 9 * sw + 2 * sw + sw * fw + 2 * fw
    ho, wo, c_last = specs[-1]["out_shape"] if specs else (hs, ws, fw)
    flops += ho * wo * c_last * hw + hw * cfg.num_classes
    params += c_last * hw + 2 * hw + hw * cfg.num_classes + cfg.num_classes
    return float(flops), float(params)


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(_Config))


def _genotype_from_text(genotype: Any) -> Any:
    """A genotype as written in result.json (``"['op', ...]"``) -> the list of op names."""
    if not isinstance(genotype, str):
        return genotype
    import ast

    try:
        return list(ast.literal_eval(genotype))
    except (ValueError, SyntaxError):
        raise ValueError(f"`genotype` {genotype!r} is not a list of MBConv op names") from None


def _check_genotype(cfg: _Config, genotype: Sequence[str]) -> tuple[str, ...]:
    if isinstance(genotype, str) or not isinstance(genotype, Sequence):
        raise TypeError(f"`genotype` must be a sequence of op names (one per layer), got {type(genotype).__name__}")
    genotype = tuple(genotype)
    if len(genotype) != cfg.num_layers:
        raise ValueError(f"`genotype` has {len(genotype)} ops, the space has {cfg.num_layers} searchable layers")
    for i, op in enumerate(genotype):
        if op not in cfg.op_names:
            raise ValueError(f"`genotype[{i}]`: unknown op {op!r}; the space's ops are {cfg.op_names}")
        if op == SKIP and not cfg.skip_allowed[i]:
            raise ValueError(f"`genotype[{i}]`: skip is not allowed in layer {i} (stride {cfg.strides[i]}, "
                             f"{cfg.in_widths[i]} -> {cfg.widths[i]} channels)")
    return genotype


@dataclasses.dataclass(frozen=True)
class MBConvSpace(SpaceDefaults, _Base):
    """The layer-wise MBConv supernet; see :func:`search_space`."""

    config: _Config
    _where = "mbconv"

    @property
    def op_names(self) -> tuple[str, ...]:
        return self.config.op_names

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def skip_allowed(self) -> tuple[bool, ...]:
        return self.config.skip_allowed

    @property
    def op_mask(self) -> np.ndarray:
        return self.config.op_mask

    @property
    def module(self) -> MBConvNetwork:
        mask = self.config.op_mask
        ops = tuple(tuple(n for j, n in enumerate(self.op_names) if mask[i, j]) for i in range(self.num_layers))
        return MBConvNetwork(self.config, ops)

    @property
    def arch_shapes(self) -> dict:
        return {"layers": jax.ShapeDtypeStruct((self.num_layers, len(self.op_names)), jnp.float32)}

    def _dummy_mix(self, dtype):
        return jnp.zeros((self.num_layers, len(self.op_names)), dtype)

    def init_arch(self, key: jax.Array) -> dict:
        """``{"layers": (num_layers, num_ops)}``: ``1e-3 * normal`` logits, :data:`MASKED_LOGIT`
        where a layer has no such candidate."""
        a = 1e-3 * jax.random.normal(key, (self.num_layers, len(self.op_names)), jnp.float32)
        return {"layers": jnp.where(jnp.asarray(self.op_mask), a, MASKED_LOGIT)}

    def apply(self, weights: PyTree, state: PyTree, mix: PyTree, x: jax.Array, train: bool, *,
              rng: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
        """Logits ``(B, num_classes)`` of the supernet, layer ``i`` computing
        ``sum_k mix["layers"][i, k] * candidate_k`` over its allowed candidates; train mode uses
        batch statistics and returns the updated BN state. ``rng`` is unused."""
        x = _check_input(x, self.config, "mbconv.apply")
        check_mix_matches(self.arch_shapes, mix)
        return self._run(weights, state, jnp.asarray(mix["layers"]).astype(x.dtype), x, train)

    def genotype(self, arch: PyTree) -> list[str]:
        """Per layer the op with the largest logit among the layer's candidates."""
        check_mix_matches(self.arch_shapes, arch, name="arch")
        a = np.where(self.op_mask, np.asarray(arch["layers"], np.float64), -np.inf)
        return [self.op_names[j] for j in np.argmax(a, axis=-1)]

    def arch_from_genotype(self, genotype: Sequence[str], scale: float = 10.0) -> dict:
        """Logits that decode to ``genotype``: ``scale`` on the chosen op, 0 on the others,
        :data:`MASKED_LOGIT` on candidates the layer does not have."""
        genotype = _check_genotype(self.config, genotype)
        a = np.where(self.op_mask, 0.0, MASKED_LOGIT).astype(np.float32)
        for i, op in enumerate(genotype):
            a[i, self.op_names.index(op)] = scale
        return {"layers": jnp.asarray(a)}

    def random_genotype(self, key: jax.Array) -> list[str]:
        """Uniform over each layer's allowed candidates."""
        u = np.asarray(jax.random.uniform(key, (self.num_layers, len(self.op_names))))
        return [self.op_names[j] for j in np.argmax(np.where(self.op_mask, u, -1.0), axis=-1)]

    def num_choices(self, arch: PyTree | None = None) -> int:
        return int(np.prod(self.op_mask.sum(-1), dtype=object))

    def codec(self):
        """:func:`diffnas_jax.baselines.codec.layerwise_codec` with each layer's allowed ops."""
        from diffnas_jax.baselines.codec import layerwise_codec

        allowed = [tuple(np.flatnonzero(row).tolist()) for row in self.op_mask]
        return layerwise_codec(self.op_names, self.num_layers, allowed)

    def candidate_names(self, leaf: str) -> tuple[str, ...]:
        """The op names of the ``"layers"`` leaf (masked candidates included)."""
        return leaf_candidates("mbconv.candidate_names", leaf, {leaf_key("layers"): self.op_names})

    def eval_network(self, genotype: Sequence[str] | str, **size: Any) -> "MBConvEvalNetwork":
        """The discrete network of ``genotype`` (op names, one per layer, or their text form
        ``"['op', ...]"``) with this space's configuration, any field of which ``size`` may
        override (e.g. ``num_classes``, ``widths``); its weights are the supernet's subtrees of
        the chosen candidates (see :meth:`inherit`)."""
        check_size_kwargs("mbconv.eval_network", size, _CONFIG_FIELDS)
        space = search_space(**{**dataclasses.asdict(self.config), **size}) if size else self
        return MBConvEvalNetwork(space.config, _check_genotype(space.config, _genotype_from_text(genotype)))

    def cost_table(self, input_shape: Sequence[int] | None = None, metric: str = "flops", **size: Any):
        """:class:`~diffnas_jax.cost.CostTable` ``{"layers": (num_layers, num_ops)}`` (0 for skip
        and masked candidates) with the stem, first block, head and classifier as the constant:
        the expected cost ``constant + sum(mix * table)`` of FBNet / ProxylessNAS."""
        from diffnas_jax.cost.table import analytic_table, check_static_metric

        check_static_metric(metric)
        check_size_kwargs("mbconv.cost_table", size, ())
        t = self.layer_cost_arrays(tuple(input_shape) if input_shape is not None else (32, 32, 3))
        return analytic_table({"layers": t[metric]}, t[f"base_{metric}"], metric)

    def network_cost(self, genotype: Sequence[str] | str, input_shape: Sequence[int] | None = None, **size: Any):
        """:class:`~diffnas_jax.cost.Cost` of the discrete network of ``genotype``."""
        from diffnas_jax.cost.analytic import Cost

        check_size_kwargs("mbconv.network_cost", size, ())
        d = self.count_flops_params(_genotype_from_text(genotype),
                                    tuple(input_shape) if input_shape is not None else (32, 32, 3))
        return Cost(int(d["flops"]), int(d["params"]))

    def inherit(self, weights: PyTree, state: PyTree, genotype: Sequence[str]) -> tuple[PyTree, PyTree]:
        """The supernet's weights and BN state restricted to ``genotype`` (for
        ``eval_network(genotype)``)."""
        genotype = _check_genotype(self.config, genotype)

        def pick(tree):
            out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
            for i, op in enumerate(genotype):
                out[f"layers_{i}"] = {op: tree[f"layers_{i}"][op]} if op != SKIP else {}
            return {k: v for k, v in out.items() if not (k.startswith("layers_") and v == {})}

        return pick(weights), pick(state)


@dataclasses.dataclass(frozen=True)
class MBConvEvalNetwork(_Base):
    """A discrete MBConv network (one op per layer); ``apply`` ignores ``mix`` (pass ``None``)."""

    config: _Config
    genotype_ops: tuple[str, ...]
    _where = "mbconv.eval_network"

    @property
    def module(self) -> MBConvNetwork:
        return MBConvNetwork(self.config, tuple((op,) for op in self.genotype_ops))

    def apply(self, weights: PyTree, state: PyTree, mix: Any, x: jax.Array, train: bool, *,
              rng: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
        x = _check_input(x, self.config, "mbconv.eval_network.apply")
        return self._run(weights, state, None, x, train)

    def genotype(self, arch: Any = None) -> list[str]:
        return list(self.genotype_ops)


def search_space(num_classes: int = 10, widths: Sequence[int] = DEFAULT_WIDTHS,
                 strides: Sequence[int] = DEFAULT_STRIDES, kernel_sizes: Sequence[int] = (3, 5, 7),
                 expansions: Sequence[int] = (3, 6), allow_skip: bool = True, *, stem_width: int = 16,
                 stem_stride: int = 1, first_width: int = 16, head_width: int = 128) -> MBConvSpace:
    """A MobileNetV2-style layer-wise space (FBNet, Wu et al. CVPR 2019; ProxylessNAS, Cai et al.
    ICLR 2019): per searchable layer one of ``MBConv(k, e)`` for ``k in kernel_sizes``,
    ``e in expansions``, or ``skip`` where the layer keeps its shape.

    Args:
      num_classes: classifier outputs.
      widths, strides: output channels and stride of each searchable layer (same length).
        Defaults: 6 layers, 24-24-32-32-64-64 channels, strides 1-1-2-1-2-1 (32x32 -> 8x8).
      kernel_sizes: odd depthwise kernel sizes. expansions: expansion ratios.
      allow_skip: add the ``skip`` candidate (only in layers with stride 1 and equal widths).
      stem_width, stem_stride, first_width, head_width: fixed parts (see the module docstring).

    Returns:
      An :class:`MBConvSpace`: ``init``, ``init_arch -> {"layers": (L, num_ops)}``, ``apply``,
      ``genotype -> list of op names``, ``op_names``, ``op_mask``, ``layer_specs``,
      ``cost_table``, ``count_flops_params``, ``codec``, ``eval_network``, ``inherit``.
    """
    check_int_in_range("num_classes", num_classes, 1, 1 << 20)
    widths, strides = tuple(widths), tuple(strides)
    if not widths:
        raise ValueError("`widths` must name at least one searchable layer")
    if len(widths) != len(strides):
        raise ValueError(f"`widths` ({len(widths)}) and `strides` ({len(strides)}) must have the same length")
    for i, c in enumerate(widths):
        check_int_in_range(f"widths[{i}]", c, 1, 1 << 16)
    for i, s in enumerate(strides):
        check_int_in_range(f"strides[{i}]", s, 1, 2)
    kernel_sizes, expansions = tuple(kernel_sizes), tuple(expansions)
    if not kernel_sizes or not expansions:
        raise ValueError("`kernel_sizes` and `expansions` must be non-empty")
    for i, k in enumerate(kernel_sizes):
        check_int_in_range(f"kernel_sizes[{i}]", k, 1, 15)
        if k % 2 == 0:
            raise ValueError(f"`kernel_sizes[{i}]`={k} must be odd ('same' padding k // 2)")
    for i, e in enumerate(expansions):
        check_int_in_range(f"expansions[{i}]", e, 1, 64)
    if len(set(kernel_sizes)) != len(kernel_sizes) or len(set(expansions)) != len(expansions):
        raise ValueError("`kernel_sizes` and `expansions` must not repeat values")
    check_int_in_range("stem_width", stem_width, 1, 1 << 16)
    check_int_in_range("stem_stride", stem_stride, 1, 2)
    check_int_in_range("first_width", first_width, 1, 1 << 16)
    check_int_in_range("head_width", head_width, 1, 1 << 16)
    return MBConvSpace(_Config(num_classes, widths, strides, kernel_sizes, expansions, bool(allow_skip),
                               stem_width, stem_stride, first_width, head_width))


def eval_network(genotype: Sequence[str] | str, **space_kwargs: Any) -> MBConvEvalNetwork:
    """The discrete network of ``genotype`` (a list of op names, one per layer) in the space
    ``search_space(**space_kwargs)``."""
    return search_space(**space_kwargs).eval_network(genotype)
