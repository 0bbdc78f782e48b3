"""Builders of today's RectangularFlow models, with their defaults written once, and the
rebuild of a saved model from the builder call it records.

    model = RectangularFlow.tabular(43, 21)                      # MINIBOONE-sized
    model = RectangularFlow.images((1, 28, 28), 20, levels=2)    # an image model
    model = FreeFormFlow.mlp(43, 21)                             # free-form, FIF's ResNet
    model = RectangularFlow.tabular(2, 1, base=StudentT(1, dof=3))

A builder constructs h, then f, in a fixed order (so that a seed gives the same initial
weights as every earlier version) and records its arguments in ``model.config``, which
:meth:`RectangularFlow.save` writes and :func:`from_config` rebuilds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..nn import (
    ActNorm,
    AffineCoupling,
    Bijection,
    ElementwiseSpline,
    FixedAffine,
    Permutation,
    Reverse,
    Sequential,
)
from ..nn.image import LogitPixels, image_flow
from ..nn.plain import ElementwiseAffine, Residual
from .distributions import BaseDistribution, StandardNormal, StudentT, as_base
from .free_form import FreeFormFlow
from .injective import InjectiveFlow
from .rectangular import RectangularFlow

__all__ = ["tabular", "images", "free_form", "free_form_images", "for_data", "from_config",
           "default_ambient_size", "prior_flow", "base_spec", "base_from_spec", "BUILDERS",
           "MODEL_KINDS"]


def default_ambient_size(ambient_dim: int) -> tuple[int, tuple[int, ...]]:
    """``(layers, hidden)`` of the tabular ambient flow h by default: 8 couplings with MLP
    64-64 conditioners for D ≤ 8 (as many couplings, at a quarter of the cost per step, learn
    the low-dimensional sets as well: docs/experiments.md), else 10 with MLP 128×4."""
    return (8, (64, 64)) if ambient_dim <= 8 else (10, (128,) * 4)


def base_spec(base: BaseDistribution | None) -> dict:
    """A library base as a JSON-able dict (what a builder records)."""
    if base is None or type(base) is StandardNormal:
        return {"type": "normal"}
    if type(base) is StudentT:
        return {"type": "student-t", "dof": base.dof}
    raise TypeError(f"a builder records its base to rebuild the model from a file, and can "
                    f"record StandardNormal and StudentT only, got {type(base).__name__}; "
                    "compose RectangularFlow(ambient, latent_dim, prior, base) yourself for "
                    "another base")


def base_from_spec(spec: dict | None, dim: int) -> BaseDistribution:
    """The inverse of :func:`base_spec`."""
    spec = spec or {"type": "normal"}
    if spec.get("type") == "normal":
        return StandardNormal(dim)
    if spec.get("type") == "student-t":
        return StudentT(dim, int(spec["dof"]))
    raise ValueError(f"unknown base {spec!r}; expected type 'normal' or 'student-t'")


def _data_layers(D: int, data_shift, data_scale, logit_alpha) -> list[Bijection]:
    """The fixed data-side end of h: standardisation ``x·scale + shift``, then the logit of
    pixels (see :class:`~injflow_ext.nn.LogitPixels`)."""
    if (data_shift is None) != (data_scale is None):
        raise ValueError("give both data_shift and data_scale, or neither")
    layers: list[Bijection] = []
    if data_shift is not None:
        layers.append(FixedAffine(D, data_shift, data_scale))
    if logit_alpha is not None:
        layers.append(LogitPixels(D, logit_alpha))
    return layers


def prior_flow(latent_dim: int, layers: int = 5, hidden: Sequence[int] = (32, 32),
               activation: str = "tanh", scale: str = "tanh", actnorm: bool = True,
               spline_bins: int = 0) -> Sequential:
    """f: ``layers`` blocks of (ActNorm, AffineCoupling with MLP ``hidden``, an elementwise
    spline when ``spline_bins`` > 0, Reverse) on ``R^latent_dim``. For
    d = 1 the couplings have nothing to condition on and are affine, so without the spline the
    prior on u stays Gaussian. With 0 layers f is the identity (an empty Sequential)."""
    blocks: list[Bijection] = []
    for _ in range(layers):
        if actnorm:
            blocks.append(ActNorm(latent_dim))
        blocks.append(AffineCoupling(latent_dim, hidden, activation, scale=scale))
        if spline_bins:
            blocks.append(ElementwiseSpline(latent_dim, bins=spline_bins))
        blocks.append(Reverse(latent_dim))
    return Sequential(*blocks)


def _floats(v):
    return None if v is None else [float(x) for x in v]


def tabular(ambient_dim: int, latent_dim: int, *, ambient_layers: int | None = None,
            ambient_hidden: Sequence[int] | None = None, prior_layers: int = 5,
            prior_hidden: Sequence[int] = (32, 32), prior_spline_bins: int = 0,
            activation: str = "tanh", scale: str = "tanh", actnorm: bool = True, seed: int = 0,
            permutation: str = "random", base: BaseDistribution | None = None,
            logit_alpha: float | None = None, data_shift: Sequence[float] | None = None,
            data_scale: Sequence[float] | None = None) -> RectangularFlow:
    """The tabular model: h of ``ambient_layers`` blocks (ActNorm, AffineCoupling with MLP
    ``ambient_hidden`` conditioners, a fixed permutation), f of :func:`prior_flow`.

    Args: ambient_layers, ambient_hidden (default :func:`default_ambient_size`); prior_layers,
    prior_hidden, prior_spline_bins; activation and scale ("tanh" bounded or "exp") of every
    coupling; actnorm; seed of the random permutations; permutation ("random", from seed, or
    "reverse"; in D = 2 alternating them learned worse densities: docs/experiments.md);
    base (None: standard normal, or StudentT); data_shift, data_scale: a fixed per-feature
    standardisation ``x = x_std·scale + shift`` as h's last layer, so that the model trains on
    standardised data while its maps and densities are in the data's units; logit_alpha:
    pixel data, see :class:`~injflow_ext.nn.LogitPixels`."""
    for name, v in (("ambient_dim", ambient_dim), ("latent_dim", latent_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"RectangularFlow.tabular: {name} must be a positive int, got {v!r}")
    if permutation not in ("random", "reverse"):
        raise ValueError(f"RectangularFlow.tabular: permutation must be 'random' or 'reverse', "
                         f"got {permutation!r}")
    D, d = ambient_dim, latent_dim
    layers_default, hidden_default = default_ambient_size(D)
    ambient_layers = layers_default if ambient_layers is None else ambient_layers
    ambient_hidden = hidden_default if ambient_hidden is None else tuple(ambient_hidden)
    if d >= D:
        raise ValueError(f"RectangularFlow.tabular: latent_dim must be smaller than ambient_dim "
                         f"(an injective flow maps R^d into R^D with d < D), got "
                         f"latent_dim={d}, ambient_dim={D}")
    base_record = base_spec(as_base(base, d))
    h: list[Bijection] = []
    for i in range(ambient_layers):
        if actnorm:
            h.append(ActNorm(D))
        h.append(AffineCoupling(D, ambient_hidden, activation, scale=scale))
        h.append(Reverse(D) if permutation == "reverse" else Permutation(D, seed=seed + i))
    f = prior_flow(d, prior_layers, prior_hidden, activation, scale, actnorm, prior_spline_bins)
    h += _data_layers(D, data_shift, data_scale, logit_alpha)
    model = RectangularFlow(Sequential(*h), d, f, base, ambient_dim=D)
    model.config = {"builder": "tabular", "ambient_dim": D, "latent_dim": d,
                    "ambient_layers": ambient_layers, "ambient_hidden": list(ambient_hidden),
                    "prior_layers": prior_layers, "prior_hidden": list(prior_hidden),
                    "prior_spline_bins": prior_spline_bins, "activation": activation,
                    "scale": scale, "actnorm": actnorm, "seed": seed, "permutation": permutation,
                    "base": base_record, "logit_alpha": logit_alpha,
                    "data_shift": _floats(data_shift), "data_scale": _floats(data_scale)}
    return model


def images(shape: Sequence[int], latent_dim: int, *, levels: int = 2, couplings: int = 4,
           hidden: Sequence[int] = (32, 32), activation: str = "relu", prior_layers: int = 5,
           prior_hidden: Sequence[int] = (32, 32), prior_activation: str = "tanh",
           prior_spline_bins: int = 0, scale: str = "tanh", actnorm: bool = True, seed: int = 0,
           base: BaseDistribution | None = None, logit_alpha: float | None = None,
           data_shift: Sequence[float] | None = None,
           data_scale: Sequence[float] | None = None) -> RectangularFlow:
    """The image model: images ``shape = (C, H, W)`` on a ``latent_dim``-dimensional manifold.
    h is :func:`~injflow_ext.nn.image_flow` (``levels`` scales of ``couplings`` blocks of
    ChannelActNorm, 1 × 1 convolution and checkerboard couplings with CNN conditioners of
    widths ``hidden`` and ``activation``), f an MLP flow on the latent (:func:`prior_flow` with
    ``prior_activation`` and the couplings' ``scale``). Other arguments as :func:`tabular`."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"RectangularFlow.images: shape must be (C, H, W), got {shape}")
    D, d = math.prod(shape), latent_dim
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d < D:
        raise ValueError(f"RectangularFlow.images: latent_dim must be an int in [1, {D}), got "
                         f"{d!r}")
    base_record = base_spec(as_base(base, d))
    h = list(image_flow(shape, levels=levels, couplings=couplings, hidden=hidden,
                        activation=activation, seed=seed, actnorm=actnorm).layers)
    f = prior_flow(d, prior_layers, prior_hidden, prior_activation, scale, actnorm,
                   prior_spline_bins)
    h += _data_layers(D, data_shift, data_scale, logit_alpha)
    model = RectangularFlow(Sequential(*h), d, f, base, data_shape=shape)
    model.config = {"builder": "images", "shape": list(shape), "latent_dim": d,
                    "levels": levels, "couplings": couplings, "hidden": list(hidden),
                    "activation": activation, "prior_layers": prior_layers,
                    "prior_hidden": list(prior_hidden), "prior_activation": prior_activation,
                    "prior_spline_bins": prior_spline_bins, "scale": scale, "actnorm": actnorm,
                    "seed": seed, "base": base_record, "logit_alpha": logit_alpha,
                    "data_shift": _floats(data_shift), "data_scale": _floats(data_scale)}
    return model


_PLAIN_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU,
                      "softplus": nn.Softplus, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU,
                      "gelu": nn.GELU}


def _plain_activation(name: str, owner: str) -> nn.Module:
    if name not in _PLAIN_ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {list(_PLAIN_ACTIVATIONS)}, got "
                         f"{name!r}")
    return _PLAIN_ACTIVATIONS[name]()


def _free_form_prior(latent_dim, prior_layers, prior_hidden, scale, actnorm, prior_spline_bins):
    if prior_layers == 0:
        return None
    return prior_flow(latent_dim, prior_layers, prior_hidden, "tanh", scale, actnorm,
                      prior_spline_bins)


def _standardisation(data_shift, data_scale) -> tuple[list, list]:
    """(encoder's first layers, decoder's last layers) of a fixed standardisation."""
    if (data_shift is None) != (data_scale is None):
        raise ValueError("give both data_shift and data_scale, or neither")
    if data_shift is None:
        return [], []
    to_data = ElementwiseAffine(data_shift, data_scale)
    return [to_data.inverse_module()], [to_data]


def free_form(ambient_dim: int, latent_dim: int, *, hidden: Sequence[int] = (256, 256),
              blocks: int = 2, activation: str = "silu", prior_layers: int = 0,
              prior_hidden: Sequence[int] = (32, 32), prior_spline_bins: int = 0,
              scale: str = "tanh", actnorm: bool = True, base: BaseDistribution | None = None,
              data_shift: Sequence[float] | None = None,
              data_scale: Sequence[float] | None = None) -> FreeFormFlow:
    """A free-form model of tabular data, FIF's ResNet (vislearn/FFF ``fff.model.ResNet``):
    encoder ``blocks`` residual blocks ``x + MLP(x)`` (widths ``hidden``, ``activation``) in
    data space, then a linear map to ``R^latent_dim``; the decoder the mirror image. Optional
    prior flow on the latent (``prior_layers`` > 0, :func:`prior_flow`; FIF has none) and a
    fixed standardisation (``data_shift``, ``data_scale``) at the data end of both networks."""
    D, d = ambient_dim, latent_dim
    for name, v in (("ambient_dim", D), ("latent_dim", d), ("blocks", blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "blocks" else 1):
            raise ValueError(f"FreeFormFlow.mlp: {name} must be a "
                             f"{'non-negative' if name == 'blocks' else 'positive'} int, got {v!r}")
    base_record = base_spec(as_base(base, d))

    def resnet():
        return [Residual(nn.Sequential(*[m for a, b in zip([D, *hidden], [*hidden, D])
                                         for m in (nn.Linear(a, b),
                                                   _plain_activation(activation,
                                                                     "FreeFormFlow.mlp"))][:-1]))
                for _ in range(blocks)]
    into, out_of = _standardisation(data_shift, data_scale)
    encoder = nn.Sequential(*into, *resnet(), nn.Linear(D, d))
    decoder = nn.Sequential(nn.Linear(d, D), *resnet(), *out_of)
    prior = _free_form_prior(d, prior_layers, prior_hidden, scale, actnorm, prior_spline_bins)
    model = FreeFormFlow(encoder, decoder, d, base, prior)
    model.config = {"builder": "free-form", "ambient_dim": D, "latent_dim": d,
                    "hidden": list(hidden), "blocks": blocks, "activation": activation,
                    "prior_layers": prior_layers, "prior_hidden": list(prior_hidden),
                    "prior_spline_bins": prior_spline_bins, "scale": scale, "actnorm": actnorm,
                    "base": base_record, "data_shift": _floats(data_shift),
                    "data_scale": _floats(data_scale)}
    return model


def free_form_images(shape: Sequence[int], latent_dim: int, *, channels: Sequence[int] = (32, 64),
                     hidden: Sequence[int] = (256,), activation: str = "silu",
                     prior_layers: int = 0, prior_hidden: Sequence[int] = (32, 32),
                     prior_spline_bins: int = 0, scale: str = "tanh", actnorm: bool = True,
                     base: BaseDistribution | None = None,
                     data_shift: Sequence[float] | None = None,
                     data_scale: Sequence[float] | None = None) -> FreeFormFlow:
    """A free-form model of images ``shape = (C, H, W)``: the encoder a CNN (per entry of
    ``channels`` a 4 × 4 convolution of stride 2, then ``activation``), then fully connected
    layers ``hidden`` to ``R^latent_dim``; the decoder the mirror image with transposed
    convolutions. H and W must be divisible by ``2 ** len(channels)``. Other arguments as
    :func:`free_form` (the standardisation: one shift and scale for all pixels)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"FreeFormFlow.images: shape must be (C, H, W), got {shape}")
    C, H, W = shape
    D, d = C * H * W, latent_dim
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d < D:
        raise ValueError(f"FreeFormFlow.images: latent_dim must be an int in [1, {D}), got {d!r}")
    f = 2 ** len(channels)
    if H % f or W % f:
        raise ValueError(f"FreeFormFlow.images: {len(channels)} stride-2 convolutions need H and W "
                         f"divisible by {f}, got {H} × {W}; pass fewer channels")
    base_record = base_spec(as_base(base, d))

    def act():
        return _plain_activation(activation, "FreeFormFlow.images")
    widths = [C, *channels]
    flat = widths[-1] * (H // f) * (W // f)
    into, out_of = _standardisation(data_shift, data_scale)
    enc = [*into]
    for a, b in zip(widths[:-1], widths[1:]):
        enc += [nn.Conv2d(a, b, 4, stride=2, padding=1), act()]
    enc.append(nn.Flatten())
    for a, b in zip([flat, *hidden], hidden):
        enc += [nn.Linear(a, b), act()]
    enc.append(nn.Linear(([flat, *hidden])[-1], d))
    dec = []
    for a, b in zip([d, *hidden[::-1]], [*hidden[::-1], flat]):
        dec += [nn.Linear(a, b), act()]
    dec.append(nn.Unflatten(1, (widths[-1], H // f, W // f)))
    rev = widths[::-1]
    for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
        dec.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
        if i < len(rev) - 2:
            dec.append(act())
    dec += out_of
    prior = _free_form_prior(d, prior_layers, prior_hidden, scale, actnorm, prior_spline_bins)
    model = FreeFormFlow(nn.Sequential(*enc), nn.Sequential(*dec), d, base, prior,
                         data_shape=shape)
    model.config = {"builder": "free-form-images", "shape": list(shape), "latent_dim": d,
                    "channels": list(channels), "hidden": list(hidden), "activation": activation,
                    "prior_layers": prior_layers, "prior_hidden": list(prior_hidden),
                    "prior_spline_bins": prior_spline_bins, "scale": scale, "actnorm": actnorm,
                    "base": base_record, "data_shift": _floats(data_shift),
                    "data_scale": _floats(data_scale)}
    return model


#: builder name -> (builder, its positional arguments in a config)
BUILDERS = {"tabular": (tabular, ("ambient_dim", "latent_dim")),
            "images": (images, ("shape", "latent_dim")),
            "free-form": (free_form, ("ambient_dim", "latent_dim")),
            "free-form-images": (free_form_images, ("shape", "latent_dim"))}
#: kind of model -> (builder of flat data, builder of images)
MODEL_KINDS = {"rectangular": ("tabular", "images"), "free-form": ("free-form", "free-form-images")}


def from_config(config: dict) -> InjectiveFlow:
    """The model a builder records in ``model.config`` (also the keyword arguments of the
    constructor of versions before 2026-12, which model files and run directories of those
    versions hold)."""
    cfg = dict(config)
    name = cfg.pop("builder", None)
    if name is None:
        name, cfg = _from_v1(cfg)
    if name not in BUILDERS:
        raise ValueError(f"unknown model builder {name!r}; expected one of {list(BUILDERS)}")
    cfg["base"] = base_from_spec(cfg.get("base"), cfg["latent_dim"])
    builder, positional = BUILDERS[name]
    args = [cfg.pop(k) for k in positional]
    return builder(*args, **cfg)


def _from_v1(cfg: dict) -> tuple[str, dict]:
    """A version-1 config (``RectangularFlow(ambient_dim, latent_dim, **kwargs)``) as a builder
    call that constructs the same modules in the same order."""
    base = ({"type": "student-t", "dof": cfg.get("base_dof", 3)}
            if cfg.get("base") == "student-t" else {"type": "normal"})
    common = {k: cfg[k] for k in ("latent_dim", "prior_layers", "prior_hidden",
                                  "prior_spline_bins", "scale", "actnorm", "seed", "logit_alpha",
                                  "data_shift", "data_scale") if k in cfg}
    common["base"] = base
    if cfg.get("image_shape") is not None:
        return "images", {**common, "shape": cfg["image_shape"],
                          "levels": cfg.get("image_levels", 2),
                          "couplings": cfg.get("ambient_layers", 4),
                          "hidden": cfg.get("image_hidden", (32, 32)),
                          "activation": cfg.get("image_activation", "relu"),
                          "prior_activation": cfg.get("activation", "tanh")}
    return "tabular", {**common, "ambient_dim": cfg["ambient_dim"],
                       "ambient_layers": cfg.get("ambient_layers", 10),
                       "ambient_hidden": cfg.get("ambient_hidden", (128,) * 4),
                       "activation": cfg.get("activation", "tanh"),
                       "permutation": cfg.get("permutation", "random")}


def for_data(train, latent_dim: int, model_shape: Sequence[int] | None = None, *,
             standardize: bool = True, logit_alpha: float | None = None,
             kind: str = "rectangular", **sizes) -> InjectiveFlow:
    """The model for training data ``train (N, D)`` (numpy) of ``kind`` ("rectangular" or
    "free-form", :data:`MODEL_KINDS`): its image builder (:func:`images`,
    :func:`free_form_images`) when ``model_shape = (C, H, W)`` is given (a dataset's
    ``model_shape``), else its flat one (:func:`tabular`, :func:`free_form`),
    with the data's standardisation as a fixed last layer of h (per feature; for images one
    mean and std over all pixels: per pixel, MNIST's near-constant border pixels would be
    blown up into unit-variance noise that h must carry like the strokes). With
    ``logit_alpha`` the data must be in (0, 1) and the standardisation acts in logit space,
    where h's output lives. ``sizes``: the builder's other arguments."""
    import numpy as np

    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {list(MODEL_KINDS)}, got {kind!r}")
    flat_builder, image_builder = (BUILDERS[b][0] for b in MODEL_KINDS[kind])
    x = np.asarray(train, dtype=np.float64)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(1)
    if bad.any():
        raise ValueError(f"the training data has {int(bad.sum())} rows with NaN or inf values "
                         f"(first rows: {np.nonzero(bad)[0][:10].tolist()}); clean or drop them "
                         "first")
    if logit_alpha is not None and kind == "free-form":
        raise ValueError("logit_alpha is for rectangular models; a free-form model trains on "
                         "the (standardised) data as it is")
    if logit_alpha is not None:
        if not 0 <= logit_alpha < 0.5:
            raise ValueError(f"logit_alpha must be in [0, 0.5), got {logit_alpha}")
        if x.min() <= 0 or x.max() >= 1:
            raise ValueError(f"logit_alpha needs data in (0, 1) (dequantised pixels); the data "
                             f"spans [{x.min():.3g}, {x.max():.3g}]")
        p = logit_alpha + (1 - 2 * logit_alpha) * x
        x = np.log(p) - np.log1p(-p)
    shift = scale = None
    if standardize and model_shape is not None:
        shift, scale = np.full(x.shape[1], x.mean()), np.full(x.shape[1], x.std())
    elif standardize:
        shift, scale = x.mean(0), x.std(0) + 1e-6 * (np.abs(x).max() + 1e-12)
    if logit_alpha is not None:
        sizes["logit_alpha"] = logit_alpha
    if model_shape is not None:
        if kind == "free-form" and shift is not None:   # one shift and scale for all pixels
            shift, scale = shift[:1], scale[:1]
        return image_builder(model_shape, latent_dim, data_shift=shift, data_scale=scale,
                             **sizes)
    return flat_builder(x.shape[1], latent_dim, data_shift=shift, data_scale=scale, **sizes)
