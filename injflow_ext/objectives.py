"""Training objectives of a RectangularFlow, one class per method (docs/design.md §1).

An objective owns its loss terms, its parameter groups and its phases; the training step
(:class:`injflow_ext.step.TrainStep`) runs every phase of an objective in order, each with
its own optimiser over that phase's parameters:

- :class:`ExactObjective` (RNF-ML, exact volume-term gradient), one phase ``"all"``:
  ``w·(−log p_U(u) + ½ log det JᵀJ) + β‖x − g(u)‖²``;
- :class:`HutchinsonObjective` (RNF-ML, Hutchinson + CG estimate of the volume term's
  gradient), the same loss with a surrogate in place of ``log det JᵀJ``;
- :class:`SurrogateObjective` (the encoder-Jacobian surrogate of free-form injective flows:
  no CG, two rows per sample), the same loss with that surrogate;
- :class:`TwoStepObjective` (RNF-TS baseline): phase ``"reconstruction"`` trains the ambient
  flow on ``β‖x − g(u)‖²``, phase ``"likelihood"`` trains the prior flow on
  ``−w·log p_U(sg(u))``.

``objective.loss(model, x, phase, likelihood_weight, generator)`` returns a dict with the
scalar ``"loss"`` to minimise and detached metrics (``nll``, ``prior_nll``,
``reconstruction``, ``logdet``: None where a method does not compute them) and
``"diagnostics"`` (CG iterations and convergence for Hutchinson).
A new estimator is a new class here; the step, the trainer and the CLI take it unchanged.
"""

from __future__ import annotations

import torch

from .estimators import logdet_jtj

__all__ = ["Objective", "ExactObjective", "HutchinsonObjective", "SurrogateObjective",
           "TwoStepObjective", "OBJECTIVES", "make_objective"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A batch of images ``(B, C, H, W)`` as ``(B, C·H·W)``; flat batches unchanged."""
    return x.reshape(x.shape[0], -1) if x.dim() > 2 else x


class Objective:
    """Base class. ``phases``: names of the optimisation phases, in the order a step runs
    them; ``capturable``: whether a step of it can be recorded in a CUDA graph."""

    name = "objective"
    phases: tuple = ("all",)
    capturable = True

    def __init__(self, beta: float = 50.0):
        if not beta >= 0:
            raise ValueError(f"{type(self).__name__}: beta must be >= 0, got {beta!r}")
        self.beta = float(beta)

    def parameter_groups(self, model) -> dict:
        """``{phase: [parameters]}``: what each phase's optimiser updates."""
        return {"all": list(model.parameters())}

    def loss(self, model, x: torch.Tensor, phase: str = "all",
             likelihood_weight: float | torch.Tensor = 1.0,
             generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def _check_phase(self, phase):
        if phase not in self.phases:
            raise ValueError(f"{type(self).__name__}: phase must be one of {list(self.phases)}, "
                             f"got {phase!r}")

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class _VolumeObjective(Objective):
    """RNF-ML: negative log-likelihood on the manifold plus the reconstruction penalty, with the
    volume term from :func:`injflow_ext.estimators.logdet_jtj` (``method``)."""

    method = "exact"

    def _estimator_kwargs(self) -> dict:
        return {}

    def _encode_and_volume(self, model, x, generator):
        """``(u (B, d), LogdetResult)`` of the batch."""
        u = model.encode(x)
        return u, logdet_jtj(model.decoder, u, self.method, generator=generator,
                             **self._estimator_kwargs())

    def loss(self, model, x, phase="all", likelihood_weight=1.0, generator=None):
        self._check_phase(phase)
        x = _flat(x)
        u, res = self._encode_and_volume(model, x, generator)
        rec = ((x - res.decoded) ** 2).sum(-1)
        prior_nll = -model.prior_log_prob(u)
        loss = (likelihood_weight * (prior_nll + 0.5 * res.value) + self.beta * rec).mean()
        exact = self.method == "exact"
        return {"loss": loss,
                "nll": (prior_nll + 0.5 * res.value).mean().detach() if exact else None,
                "prior_nll": prior_nll.mean().detach(),
                "reconstruction": rec.mean().detach(),
                "logdet": res.value.mean().detach() if exact else None,
                "diagnostics": res.diagnostics}


class ExactObjective(_VolumeObjective):
    """RNF-ML with the exact gradient of ``½ log det JᵀJ`` (d tangents per sample)."""

    name = "exact"
    method = "exact"


class HutchinsonObjective(_VolumeObjective):
    """RNF-ML with the Hutchinson + CG estimate of the volume term's gradient.

    Args: beta; samples (probes K per sample); probe ("normal" or "rademacher"); cg_rtol;
    cg_max_iter (default d)."""

    name = "hutchinson"
    method = "hutchinson"

    def __init__(self, beta: float = 50.0, samples: int = 1, probe: str = "normal",
                 cg_rtol: float = 1e-5, cg_max_iter: int | None = None):
        super().__init__(beta)
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"HutchinsonObjective: samples must be a positive int, got "
                             f"{samples!r}")
        self.samples, self.probe, self.cg_rtol, self.cg_max_iter = samples, probe, cg_rtol, \
            cg_max_iter

    def _estimator_kwargs(self):
        return dict(hutchinson_samples=self.samples, probe=self.probe, cg_rtol=self.cg_rtol,
                    cg_max_iter=self.cg_max_iter)


class SurrogateObjective(_VolumeObjective):
    """RNF-ML with the encoder-Jacobian surrogate of the volume term's gradient (free-form
    injective flows; docs/design.md §1): ``2 mean_k <sg(v_kᵀ f′(x)), J v_k>``, f the model's
    encoder (h⁻¹, first d coordinates). One tangent pass of 1 + K rows through the decoder and
    K backward passes through the encoder, no CG; biased where f′ is not the pseudo-inverse
    of J (docs/experiments.md measures it).

    Args: beta; samples (probes K per sample); probe ("orthonormal", the default, K ≤ d;
    "normal"; "rademacher"); encoder_at: "data" (f′ at the data x, reusing the encoder pass
    that gives u: the default) or "manifold" (f′ at g(u), where ``f′J = I`` holds exactly; one
    more encoder pass); noise: σ ≥ 0 in the data's units: the encoder sees ``x + σ·ε``,
    ``ε ~ N(0, I)``, and the reconstruction target stays x (a denoising reconstruction, which
    pulls the encoder towards the orthogonal projection onto the manifold, where ``f′ = J⁺``
    and the surrogate is exact; the likelihood is then that of the encodings of the noisy
    points, blurred along the manifold by about σ). 0 (the default) disables it."""

    name = "surrogate"
    method = "surrogate"

    def __init__(self, beta: float = 50.0, samples: int = 1, probe: str = "orthonormal",
                 encoder_at: str = "data", noise: float = 0.0):
        super().__init__(beta)
        if not noise >= 0:
            raise ValueError(f"SurrogateObjective: noise must be >= 0, got {noise!r}")
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"SurrogateObjective: samples must be a positive int, got "
                             f"{samples!r}")
        if probe not in ("orthonormal", "normal", "rademacher"):
            raise ValueError(f"SurrogateObjective: probe must be 'orthonormal', 'normal' or "
                             f"'rademacher', got {probe!r}")
        if encoder_at not in ("data", "manifold"):
            raise ValueError(f"SurrogateObjective: encoder_at must be 'data' or 'manifold', "
                             f"got {encoder_at!r}")
        self.samples, self.probe, self.encoder_at = samples, probe, encoder_at
        self.noise = float(noise)

    def _encode_and_volume(self, model, x, generator):
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, dtype=x.dtype, device=x.device,
                                             generator=generator)
        if self.encoder_at == "manifold":
            u = model.encode(x)
            x_at = None
        else:   # the encoder's graph from x gives v_kᵀ f′(x) by a backward pass
            x_at = x.detach().requires_grad_(True)
            u = model.encode(x_at)
        return u, logdet_jtj(model.decoder, u, "surrogate", hutchinson_samples=self.samples,
                             probe=self.probe, generator=generator, encoder=model.encode, x=x_at)


class TwoStepObjective(Objective):
    """RNF-TS / M-flow baseline: no volume term; reconstruction trains the ambient flow, then
    the likelihood of the (detached) encodings trains the prior flow."""

    name = "two-step"
    phases = ("reconstruction", "likelihood")

    def parameter_groups(self, model):
        groups = model.parameter_groups()
        return {"reconstruction": groups["ambient"], "likelihood": groups["prior"]}

    def loss(self, model, x, phase="reconstruction", likelihood_weight=1.0, generator=None):
        self._check_phase(phase)
        x = _flat(x)
        if phase == "reconstruction":
            u = model.encode(x)
            rec = ((x - model.decoder(u)) ** 2).sum(-1)
            with torch.no_grad():
                prior_nll = -model.prior_log_prob(u)
            return {"loss": self.beta * rec.mean(), "nll": None,
                    "prior_nll": prior_nll.mean(), "reconstruction": rec.mean().detach(),
                    "logdet": None, "diagnostics": {}}
        with torch.no_grad():
            u = model.encode(x)
            rec = ((x - model.decoder(u)) ** 2).sum(-1)
        prior_nll = -model.prior_log_prob(u)
        # the likelihood alone trains the prior flow, so a warm-up weight only scales its loss
        # (Adam undoes the scale); a weight of exactly 0 would freeze the prior instead, hence
        # the floor (the trainer's behaviour since the first version)
        weight = (likelihood_weight.clamp_min(1e-12) if isinstance(likelihood_weight, torch.Tensor)
                  else max(likelihood_weight, 1e-12))
        return {"loss": weight * prior_nll.mean(), "nll": None,
                "prior_nll": prior_nll.mean().detach(), "reconstruction": rec.mean(),
                "logdet": None, "diagnostics": {}}


OBJECTIVES = {"exact": ExactObjective, "hutchinson": HutchinsonObjective,
              "surrogate": SurrogateObjective, "two-step": TwoStepObjective}


def make_objective(objective: str | Objective, **kwargs) -> Objective:
    """An :class:`Objective` from a name ("exact", "hutchinson", "surrogate", "two-step") and its
    keyword arguments, or the objective itself (then no keyword arguments)."""
    if isinstance(objective, Objective):
        if kwargs:
            raise TypeError(f"make_objective: keyword arguments {sorted(kwargs)} are for a "
                            "name, not an Objective instance")
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {list(OBJECTIVES)} "
                         "or an injflow_ext.objectives.Objective")
    return OBJECTIVES[objective](**kwargs)
