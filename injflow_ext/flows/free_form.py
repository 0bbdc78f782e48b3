"""FreeFormFlow: an injective flow from an arbitrary encoder ``f: R^D → R^d`` and decoder
``g: R^d → R^D`` (any ``torch.nn.Module``s), as in Free-form Injective Flows (Sorrenson et al.,
ICLR 2024): ``x = g(u)``, ``u = f_prior(z)``, ``z ~ base``.

Its density on the learned manifold is the exact change of variables of the decoder at the
encoding, ``log p(x) = log p_U(u) − ½ log det(JᵀJ)``, ``u = f(x)``, ``J = g′(u)`` (what FIF
evaluates; :class:`~injflow_ext.flows.InjectiveFlow`). Training: the objective ``"fif"`` (FIF's
loss, :mod:`injflow_ext.train.fif`), or the exact and Hutchinson volume terms of the decoder at
``f(x)`` (``"exact"``, ``"hutchinson"``: RNF's gradient on a free-form decoder), or ``"two-step"``
with a prior flow. The networks carry tangents through their tangent rules
(:func:`injflow_ext.nn.tangent`): a run of Linear and activation layers is one fused op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..nn import Bijection, tangent
from .injective import InjectiveFlow

__all__ = ["FreeFormFlow", "FREE_FORM_FORMAT"]

FREE_FORM_FORMAT = "injflow_ext.FreeFormFlow/1"


class _Flat:
    """A network seen flat, as the estimators see maps: ``(B, n_in) -> (B, n_out)`` and
    ``jvp_packed((B, 1+K, n_in)) -> (B, 1+K, n_out)``, reshaping to and from the network's own
    input shape (e.g. images ``(C, H, W)``)."""

    def __init__(self, net: nn.Module, in_shape: tuple, name: str, model):
        self.net, self.in_shape, self.name, self.model = net, in_shape, name, model
        self._tangent = tangent(net, name)

    def jvp_packed(self, XV: torch.Tensor) -> torch.Tensor:
        B, R = XV.shape[:2]
        Y = self._tangent.jvp_packed(XV.reshape(B, R, *self.in_shape))
        return Y.reshape(B, R, -1)

    def linearize(self, x: torch.Tensor):
        """``(net(x) (B, n_out), lin: (B, K, n_in) -> (B, K, n_out))``; see
        :meth:`injflow_ext.nn.Tangent.linearize`."""
        B = x.shape[0]
        y, lin = self._tangent.linearize(x.reshape(B, *self.in_shape))
        return y.reshape(B, -1), lambda V: lin(V.reshape(B, V.shape[1], *self.in_shape)
                                               ).reshape(B, V.shape[1], -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], *self.in_shape)).reshape(x.shape[0], -1)


class FreeFormFlow(InjectiveFlow):
    """An injective flow of a free-form encoder and decoder.

    Args:
        encoder: f, an ``nn.Module`` mapping data ``(B, *data_shape)`` to ``(B, latent_dim)``.
        decoder: g, an ``nn.Module`` mapping ``(B, latent_dim)`` to ``(B, *data_shape)``.
        latent_dim: d < D.
        base: the distribution of z: None (standard normal, FIF's), an
            :class:`~injflow_ext.flows.BaseDistribution` or a ``torch.distributions``
            distribution with event shape ``(d,)``.
        prior: an optional flow on the latent (a :class:`~injflow_ext.nn.Bijection` of
            ``R^d``, e.g. :func:`~injflow_ext.flows.prior_flow`): ``u = prior(z)``.
        data_shape: the shape of one data point; default: what the decoder returns. The
            constructor runs both networks once on a batch of two zero latents (eval mode, no
            gradient) to check that they fit together.

    The user's networks are ``model.encoder_net`` and ``model.decoder_net``; ``model.decoder``
    is g as the estimators see it (flat, with ``jvp_packed``), ``model.encode`` is f.
    """

    model_format = FREE_FORM_FORMAT

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, base=None,
                 prior: Bijection | None = None, *, data_shape: Sequence[int] | None = None):
        super().__init__()
        for name, net in (("encoder", encoder), ("decoder", decoder)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"FreeFormFlow: {name} must be a torch.nn.Module, got "
                                f"{type(net).__name__}")
        self._check_latent("FreeFormFlow", latent_dim, prior)
        self.encoder_net, self.decoder_net = encoder, decoder
        shape = _check_networks(encoder, decoder, latent_dim, data_shape)
        self._setup(math.prod(shape), latent_dim, shape, prior, base)

    # ------------------------------------------------------------------ builders
    @classmethod
    def mlp(cls, ambient_dim: int, latent_dim: int, **sizes) -> FreeFormFlow:
        """FIF's ResNet encoder and decoder for flat data
        (:func:`injflow_ext.flows.builders.free_form`)."""
        from .builders import free_form
        return free_form(ambient_dim, latent_dim, **sizes)

    @classmethod
    def images(cls, shape: Sequence[int], latent_dim: int, **sizes) -> FreeFormFlow:
        """A convolutional encoder and decoder for images ``(C, H, W)``
        (:func:`injflow_ext.flows.builders.free_form_images`)."""
        from .builders import free_form_images
        return free_form_images(shape, latent_dim, **sizes)

    # ------------------------------------------------------------------ maps
    @property
    def decoder(self) -> _Flat:
        """g ``(B, d) -> (B, D)`` with ``jvp_packed``, for the estimators."""
        return _Flat(self.decoder_net, (self.latent_dim,), "decoder", self)

    @property
    def encoder(self) -> _Flat:
        """f ``(B, D) -> (B, d)`` with ``jvp_packed`` (flat data in), for the estimators."""
        return _Flat(self.encoder_net, self.data_shape, "encoder", self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, D) or (B, *data_shape) -> u = f(x) (B, d)``."""
        x = self._flat(x, "FreeFormFlow.encode")
        u = self.encoder(x)
        if u.shape != (x.shape[0], self.latent_dim):
            raise ValueError(f"FreeFormFlow.encode: the encoder must return (B, {self.latent_dim}),"
                             f" got {tuple(u.shape)}")
        return u

    def parameter_groups(self) -> dict:
        """``{"manifold": encoder's and decoder's parameters, "prior": the prior flow's}``."""
        return {"manifold": list(self.encoder_net.parameters()) +
                list(self.decoder_net.parameters()),
                "prior": [] if self.prior is None else list(self.prior.parameters())}


def _check_networks(encoder: nn.Module, decoder: nn.Module, d: int, data_shape) -> tuple:
    """The data shape, from one pass of both networks on two zero latents (eval mode, no
    gradient, the networks' own device and dtype); a clear error when they do not fit."""
    like = next(iter(decoder.parameters()), None)
    if like is None:
        like = next(iter(decoder.buffers()), torch.zeros(()))
    z = torch.zeros(2, d, dtype=like.dtype if like.is_floating_point() else None,
                    device=like.device)
    modes = [(m, m.training) for m in (encoder, decoder)]
    try:
        encoder.eval()
        decoder.eval()
        with torch.no_grad():
            try:
                x = decoder(z)
            except Exception as exc:
                raise ValueError(f"FreeFormFlow: the decoder cannot take latents (B, {d}) "
                                 f"(latent_dim={d}): {exc}") from exc
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != 2:
                raise ValueError(f"FreeFormFlow: the decoder must return a tensor (B, *data_shape)"
                                 f", got {tuple(x.shape) if isinstance(x, torch.Tensor) else x!r} "
                                 f"for latents (2, {d})")
            shape = tuple(x.shape[1:])
            if data_shape is not None and tuple(int(v) for v in data_shape) != shape:
                if math.prod(int(v) for v in data_shape) != math.prod(shape):
                    raise ValueError(f"FreeFormFlow: the decoder returns points of shape {shape}, "
                                     f"data_shape says {tuple(data_shape)}")
                shape = tuple(int(v) for v in data_shape)
            try:
                u = encoder(x.reshape(2, *shape))
            except Exception as exc:
                raise ValueError(f"FreeFormFlow: the encoder cannot take the decoder's output "
                                 f"(B, {', '.join(map(str, shape))}): {exc}") from exc
            if not isinstance(u, torch.Tensor) or tuple(u.shape) != (2, d):
                got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
                raise ValueError(f"FreeFormFlow: the encoder and decoder latent dimensions "
                                 f"differ: the decoder takes (B, {d}) (latent_dim={d}) and the "
                                 f"encoder returns {got[1:] if isinstance(got, tuple) else got} "
                                 f"per point ({got} for a batch of 2)")
    finally:
        for m, mode in modes:
            m.train(mode)
    return shape
