"""Training objectives, one class per method, and the registry that every other part reads.

Subclassing :class:`Objective` with a class attribute ``name`` registers the method: the
training step (``TrainStep(model, "name", ...)``), the training configuration and the
``injflow train --method`` choices and options all come from :data:`REGISTRY`. An objective
declares

- ``options``: its keyword arguments as :class:`Option` s (default, help, check), each written
  once; the command line offers them as ``--flag`` s;
- ``phases``: the optimisation phases, in the order a step runs them;
- ``parameter_groups(model)``: what each phase's optimiser updates;
- ``capturable``: whether a step of it can be recorded in a CUDA graph;
- ``loss(model, x, phase, likelihood_weight, generator) -> dict``: the scalar ``"loss"`` to
  minimise and detached metrics (``nll``, ``prior_nll``, ``reconstruction``, ``logdet``: None
  where a method does not compute them) and ``"diagnostics"`` (CG iterations and convergence
  for Hutchinson).

The four methods (docs/design.md, "The mathematics"):

- ``exact`` (RNF-ML, exact volume-term gradient), one phase ``"all"``:
  ``w·(−log p_U(u) + ½ log det JᵀJ) + β‖x − g(u)‖²``;
- ``hutchinson`` (RNF-ML, Hutchinson + CG estimate of the volume term's gradient), the same
  loss with a surrogate in place of ``log det JᵀJ``;
- ``surrogate`` (the encoder-Jacobian surrogate of free-form injective flows: no CG, two rows
  per sample), the same loss with that surrogate;
- ``two-step`` (RNF-TS baseline): phase ``"reconstruction"`` trains the manifold (the ambient
  flow; a free-form model's encoder and decoder) on
  ``β‖x − g(u)‖²``, phase ``"likelihood"`` trains the prior flow on ``−w·log p_U(sg(u))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..estimators import logdet_jtj

__all__ = ["Objective", "Option", "REGISTRY", "ExactObjective", "HutchinsonObjective",
           "SurrogateObjective", "TwoStepObjective", "make_objective", "objective_class"]

#: name -> Objective subclass, filled by subclassing (``name = "..."``)
REGISTRY: dict[str, type[Objective]] = {}


@dataclass(frozen=True)
class Option:
    """A keyword argument of an objective: its default, its help text, the type a command line
    converts it with, the values it may take, and a check ``check(value) -> message or None``.
    ``flags``: further command-line spellings (the first flag is ``--name`` with dashes)."""

    name: str
    default: Any
    help: str
    type: Callable | None = None
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    flags: tuple[str, ...] = ()

    def validate(self, owner: str, value):
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{owner}: {self.name} must be one of {list(self.choices)}, got "
                             f"{value!r}")
        problem = self.check(value) if self.check is not None else None
        if problem:
            raise ValueError(f"{owner}: {self.name} {problem}, got {value!r}")
        return value


def _positive_int(v) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else \
        "must be a positive int"


def _non_negative(v) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else \
        "must be a number >= 0"


def _positive_or_none(v) -> str | None:
    return None if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1) else \
        "must be None or a positive int"


BETA = Option("beta", 50.0, "weight β of the reconstruction term β‖x − g(u)‖²", type=float,
              check=_non_negative)
PROBES = Option("probes", 1, "probes K per sample of the volume-term estimate", type=int,
                check=_positive_int, flags=("--hutchinson-samples",))


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A batch of images ``(B, C, H, W)`` as ``(B, C·H·W)``; flat batches unchanged."""
    return x.reshape(x.shape[0], -1) if x.dim() > 2 else x


class Objective:
    """Base class of the training methods; subclass it and set ``name`` to register one.

    ``Objective(**options)``: keyword arguments named by ``options`` (see :class:`Option`),
    each checked; the values become attributes (``objective.beta``)."""

    name: ClassVar[str | None] = None
    phases: ClassVar[tuple] = ("all",)
    capturable: ClassVar[bool] = True
    options: ClassVar[tuple[Option, ...]] = (BETA,)
    #: one line for ``--method``'s help
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        if not isinstance(name, str) or not name or name.startswith("-"):
            raise ValueError(f"{cls.__name__}.name must be a non-empty string, got {name!r}")
        old = REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                       cls.__qualname__):
            raise ValueError(f"objective name {name!r} of {cls.__module__}.{cls.__qualname__} "
                             f"is taken by {old.__module__}.{old.__qualname__}")
        names = [o.name for o in cls.options]
        if len(set(names)) != len(names):
            raise ValueError(f"{cls.__name__}.options: option names repeat: {names}")
        REGISTRY[name] = cls

    def __init__(self, **options):
        owner = type(self).__name__
        declared = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(declared))
        if unknown:
            raise TypeError(f"{owner}: unknown option(s) {unknown}; it takes "
                            f"{sorted(declared) or 'none'}")
        for name, opt in declared.items():
            setattr(self, name, opt.validate(owner, options.get(name, opt.default)))
        self.check()

    @classmethod
    def defaults(cls) -> dict:
        """``{option: default}``."""
        return {o.name: o.default for o in cls.options}

    def option_values(self) -> dict:
        """``{option: value}`` of this objective (what a run's config records)."""
        return {o.name: getattr(self, o.name) for o in self.options}

    def check(self) -> None:
        """Checks across options (after each option's own); raise ValueError."""

    def check_model(self, model) -> None:
        """Checks of the options against a model (e.g. its latent dimension); raise ValueError.
        :class:`~injflow_ext.train.TrainStep` calls it."""

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
        fields = ", ".join(f"{k}={v!r}" for k, v in self.option_values().items())
        return f"{type(self).__name__}({fields})"


class _VolumeObjective(Objective):
    """RNF-ML: negative log-likelihood on the manifold plus the reconstruction penalty, with the
    volume term from :func:`injflow_ext.estimators.logdet_jtj` (``method``)."""

    method: ClassVar[str] = "exact"

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
    summary = "RNF-ML, exact volume-term gradient (1 + d rows per sample)"


class HutchinsonObjective(_VolumeObjective):
    """RNF-ML with the Hutchinson + CG estimate of the volume term's gradient."""

    name = "hutchinson"
    method = "hutchinson"
    summary = "RNF-ML, Hutchinson probes + CG estimate of the volume-term gradient"
    options = (BETA, PROBES,
               Option("probe", "normal", "kind of probe", choices=("normal", "rademacher")),
               Option("cg_rtol", 1e-5, "relative residual at which CG stops", type=float,
                      check=lambda v: None if v > 0 else "must be > 0"),
               Option("cg_max_iter", None, "CG iteration cap (default d)", type=int,
                      check=_positive_or_none))

    def _estimator_kwargs(self):
        return dict(probes=self.probes, probe=self.probe, cg_rtol=self.cg_rtol,
                    cg_max_iter=self.cg_max_iter)


class SurrogateObjective(_VolumeObjective):
    """RNF-ML with the encoder-Jacobian surrogate of the volume term's gradient (free-form
    injective flows; docs/design.md): ``2 mean_k <sg(v_kᵀ f′(x)), J v_k>``, f the model's
    encoder (h⁻¹, first d coordinates). One tangent pass of 1 + K rows through the decoder and
    K backward passes through the encoder, no CG; biased where f′ is not the pseudo-inverse
    of J (docs/experiments.md measures it).

    Options: beta; probes K; probe ("orthonormal", K ≤ d; "normal"; "rademacher");
    encoder_at: "data" (f′ at the data x, reusing the encoder pass that gives u) or
    "manifold" (f′ at g(u), where ``f′J = I`` holds exactly; one more encoder pass); noise:
    σ ≥ 0 in the data's units: the encoder sees ``x + σ·ε``, ``ε ~ N(0, I)``, and the
    reconstruction target stays x (a denoising reconstruction, which pulls the encoder towards
    the orthogonal projection onto the manifold, where ``f′ = J⁺`` and the surrogate is exact;
    the likelihood is then that of the encodings of the noisy points, blurred along the
    manifold by about σ)."""

    name = "surrogate"
    method = "surrogate"
    summary = ("the encoder-Jacobian surrogate (1 + K rows and K encoder backward passes, no "
               "CG; biased where the encoder is not the pseudo-inverse)")
    options = (BETA, PROBES,
               Option("probe", "orthonormal", "kind of probe (orthonormal needs K <= d)",
                      choices=("orthonormal", "normal", "rademacher")),
               Option("encoder_at", "data", "where the encoder's Jacobian is taken: at the data "
                      "(reusing its encoder pass) or at its projection g(u)",
                      choices=("data", "manifold")),
               Option("noise", 0.0, "σ of a denoising reconstruction: the encoder sees "
                      "x + σ·N(0, I) and reconstructs x (data units)", type=float,
                      check=_non_negative, flags=("--surrogate-noise",)))

    def check_model(self, model):
        d = getattr(model, "latent_dim", None)
        if self.probe == "orthonormal" and d is not None and self.probes > d:
            raise ValueError(f"SurrogateObjective: probe 'orthonormal' needs probes K <= d = {d}, "
                             f"got {self.probes}; use probe 'normal' for more probes")

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
        return u, logdet_jtj(model.decoder, u, "surrogate", probes=self.probes,
                             probe=self.probe, generator=generator, encoder=model.encode, x=x_at)


class TwoStepObjective(Objective):
    """RNF-TS / M-flow baseline: no volume term; reconstruction trains the ambient flow, then
    the likelihood of the (detached) encodings trains the prior flow."""

    name = "two-step"
    phases = ("reconstruction", "likelihood")
    summary = "RNF-TS: reconstruction trains h, then the likelihood of sg(u) trains f"

    def parameter_groups(self, model):
        groups = model.parameter_groups()
        if not groups["prior"]:
            raise ValueError("TwoStepObjective: the likelihood phase trains the prior flow, and "
                             "this model has none (prior=None or no parameters); use another "
                             "objective or give the model a prior flow")
        return {"reconstruction": groups["manifold"], "likelihood": groups["prior"]}

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


def objective_class(name: str) -> type[Objective]:
    """The registered objective called ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; expected one of {list(REGISTRY)} or an "
                         "injflow_ext.train.Objective (subclass it and set name to add one)")
    return REGISTRY[name]


def make_objective(objective: str | Objective, **options) -> Objective:
    """An :class:`Objective` from a registered name and its options, or the objective itself
    (then no options)."""
    if isinstance(objective, Objective):
        if options:
            raise TypeError(f"make_objective: options {sorted(options)} are for a name, not an "
                            "Objective instance")
        return objective
    return objective_class(objective)(**options)
