"""The training method of Free-form Injective Flows (FIF; Sorrenson et al., ICLR 2024), as
vislearn/FFF computes it (``fff/loss.py``: ``volume_change_surrogate``, ``fff_loss``; the
defaults of its ``configs/fif``):

    x̃ = x + σ·ε,  z = f(x̃),  loss = β‖x̃ − g(z)‖² − log p_U(z) − mean_k v_kᵀ f′(x̃) sg(g′(z) v_k)

with K probes ``v`` of scaled orthonormal columns (``E[v vᵀ] = I``). The sign: FFF's
``nll = −log p_Z(z) − surrogate``; the surrogate's gradient flows into the *encoder* (its value
estimates ``tr(f′g′)``), and the decoder learns from the reconstruction alone. The
reconstruction's target is the noisy point (FFF's ``noisy_reconstruction``, weight 10 in every
FIF config). The surrogate is :func:`injflow_ext.estimators.encoder_volume_surrogate`.

The model must have an encoder f with tangents: ``model.encoder`` (a
:class:`~injflow_ext.flows.FreeFormFlow`'s) and ``model.decoder``. A RectangularFlow's encoder
is the inverse of its ambient flow, for which the "surrogate" method is the counterpart.
"""

from __future__ import annotations

import torch

from ..estimators import encoder_volume_surrogate
from .objectives import PROBES, Objective, Option, _flat, _non_negative


class FifObjective(Objective):
    """FIF's loss (see the module docstring). Options: beta (10, FIF's), probes K (1),
    probe ("orthonormal", K ≤ d), noise σ (0, FFF's default; its configs use 0.01 on
    standardised tabular data and 0.1 on toys; in the data's units)."""

    name = "fif"
    summary = ("free-form injective flows' loss: reconstruction + the encoder-side volume "
               "surrogate (needs --model free-form)")
    options = (Option("beta", 10.0, "weight β of the reconstruction term β‖x̃ − g(f(x̃))‖² "
                      "(FIF: 10)", type=float, check=_non_negative),
               PROBES,
               Option("probe", "orthonormal", "kind of probe (orthonormal needs K <= d)",
                      choices=("orthonormal", "normal", "rademacher")),
               Option("noise", 0.0, "σ of the noise added to the data, x̃ = x + σ·N(0, I) "
                      "(data units)", type=float, check=_non_negative,
                      flags=("--surrogate-noise",)))

    def check_model(self, model):
        if not callable(getattr(getattr(model, "encoder", None), "jvp_packed", None)):
            raise ValueError(f"FifObjective: the model needs an encoder network with tangents "
                             f"(model.encoder), which a {type(model).__name__} does not have; "
                             "use a FreeFormFlow (injflow train --model free-form), or the "
                             "'surrogate' method for a RectangularFlow")
        d = getattr(model, "latent_dim", None)
        if self.probe == "orthonormal" and d is not None and self.probes > d:
            raise ValueError(f"FifObjective: probe 'orthonormal' needs probes K <= d = {d}, got "
                             f"{self.probes}; use probe 'normal' for more probes")

    def loss(self, model, x, phase="all", likelihood_weight=1.0, generator=None):
        self._check_phase(phase)
        x = _flat(x)
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, dtype=x.dtype, device=x.device,
                                             generator=generator)
        res = encoder_volume_surrogate(model.encoder, model.decoder, x, self.probes,
                                       self.probe, generator)
        rec = ((x - res.decoded) ** 2).sum(-1)
        prior_nll = -model.prior_log_prob(res.latent)
        loss = (likelihood_weight * (prior_nll - res.value) + self.beta * rec).mean()
        return {"loss": loss, "nll": None, "prior_nll": prior_nll.mean().detach(),
                "reconstruction": rec.mean().detach(), "logdet": None,
                "diagnostics": {"surrogate": res.value.mean().detach()}}
