"""The options of ``injflow train``, built from their one home each:

- the method and its options from the objective registry (:mod:`injflow_ext.train.objectives`):
  ``--method`` lists every registered objective, and each declared option is a flag;
- the model's sizes from the builders (:mod:`injflow_ext.flows.builders`): ``--model`` picks
  the kind (rectangular, free-form), the data picks flat or image; a flag left out takes the
  builder's default; a flag of another kind of model is refused;
- the loop's schedule from :class:`~injflow_ext.train.loop.TrainConfig`'s defaults, the
  data's from :class:`~injflow_ext.data.DataConfig`'s.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import fields

from .data import DataConfig, Dataset
from .flows import StudentT, for_data, free_form, free_form_images, images, tabular
from .flows.builders import MODEL_KINDS
from .train.loop import TrainConfig, warmup_steps
from .train.objectives import REGISTRY

__all__ = ["add_arguments", "data_config", "method", "objective_options", "build_model",
           "loop_options"]

_TRAIN = {f.name: f.default for f in fields(TrainConfig)}
_DATA = {f.name: f.default for f in fields(DataConfig)}


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _warmup_value(text: str) -> str:
    """A likelihood warm-up point: steps ("500") or a percentage of the run ("25%")."""
    try:
        warmup_steps((text, text), 100, 1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _hidden(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 128,128, got "
                                         f"{text!r}") from None


def _default(builder, name):
    return inspect.signature(builder).parameters[name].default


def _widths(v) -> str:
    return ",".join(map(str, v))


# the model flags each builder takes: argparse dest -> the builder's argument
_PRIOR_FLAGS = {"prior_layers": "prior_layers", "prior_hidden": "prior_hidden",
                "prior_spline_bins": "prior_spline_bins", "coupling_scale": "scale",
                "actnorm": "actnorm"}
_MODEL_FLAGS = {
    "tabular": {"ambient_layers": "ambient_layers", "ambient_hidden": "ambient_hidden",
                "activation": "activation", "permutation": "permutation", **_PRIOR_FLAGS},
    "images": {"image_levels": "levels", "image_couplings": "couplings",
               "image_hidden": "hidden", "image_activation": "activation", **_PRIOR_FLAGS},
    "free-form": {"free_form_hidden": "hidden", "free_form_blocks": "blocks",
                  "free_form_activation": "activation", **_PRIOR_FLAGS},
    "free-form-images": {"free_form_channels": "channels", "free_form_hidden": "hidden",
                         "free_form_activation": "activation", **_PRIOR_FLAGS},
}
_DESCRIBED = {"tabular": "rectangular tabular", "images": "rectangular image",
              "free-form": "free-form tabular", "free-form-images": "free-form image"}
# a flag of one kind of model -> its counterpart in the other
_COUNTERPART = {"ambient_layers": "image_couplings", "ambient_hidden": "image_hidden",
                "activation": "image_activation", "image_couplings": "ambient_layers",
                "image_hidden": "ambient_hidden", "image_activation": "activation"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_arguments(t: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's flags."""
    from .data import DATASET_NAMES, IMAGE_MODEL_DATASETS

    t.add_argument("--data", default=None,
                   help=f"dataset name ({', '.join(DATASET_NAMES)}) or a .npy/.csv file (N × D)")
    t.add_argument("--data-dir", default=_DATA["data_dir"],
                   help="folder of the tabular/image data files")
    t.add_argument("--n-samples", type=positive_int, default=_DATA["n_samples"],
                   help="use at most this many points (synthetic sets: draw this many)")
    t.add_argument("--no-standardize", dest="standardize", action="store_false",
                   default=_DATA["standardize"],
                   help="train on the raw data (default: a fixed per-feature standardisation "
                        "(image models: one mean and std over all pixels) layer inside the "
                        "model)")
    t.add_argument("--latent-dim", type=positive_int, default=None,
                   help="manifold dimension d (default: known for synthetic data)")
    t.add_argument("--model", default="rectangular", choices=list(MODEL_KINDS),
                   help="rectangular (default: an injective flow h(pad(u)) of coupling layers, "
                        "RNF) or free-form (an encoder and a decoder network, FIF's ResNet or "
                        "a CNN for images; its default --method is fif)")
    _add_objective_arguments(t)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=positive_int, default=None,
                   help=f"default {_TRAIN['epochs']}")
    g.add_argument("--steps", type=positive_int, default=None)
    t.add_argument("--batch-size", type=positive_int, default=_TRAIN["batch_size"],
                   help="global batch; under torchrun each of the N processes trains on 1/N of it")
    t.add_argument("--lr", type=float, default=_TRAIN["lr"])
    t.add_argument("--likelihood-warmup", type=_warmup_value, nargs=2, metavar=("START", "END"),
                   default=None, help="likelihood weight 0 before START, 1 after END: steps "
                   "(500) or percentages of the run (25%%)")
    t.add_argument("--seed", type=int, default=_TRAIN["seed"])
    t.add_argument("--device", default=_TRAIN["device"], choices=["cpu", "cuda"])
    t.add_argument("--step-mode", default=None,
                   choices=["auto", "eager", "compiled", "captured"],
                   help="how a training step runs (injflow_ext.TrainStep): auto (default) = "
                        "compiled and captured in a CUDA graph on a GPU (the last partial batch "
                        "of each epoch is dropped: one batch shape), compiled under torchrun, "
                        "eager on the CPU")
    t.add_argument("--precision", default=None, choices=["float32", "tf32"],
                   help="float32 GEMMs of the training step: float32 (default) or tf32 "
                        "(tensor cores, float32 accumulation; the log-determinant still "
                        "accumulates in float64)")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    t.add_argument("--out", default=None, help="run directory (default runs/DATA-METHOD)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    t.add_argument("--allow-data-change", action="store_true",
                   help="--resume even though the training data differs from the data the run "
                        "started on (config.json's fingerprint); the change is recorded")
    t.add_argument("--overwrite", action="store_true", help="start again in an existing --out")
    t.add_argument("--checkpoint-every", type=positive_int, default=_TRAIN["checkpoint_every"])
    t.add_argument("--patience", type=int, default=_TRAIN["patience"],
                   help="--select best: stop after this many epochs without validation "
                        "improvement (counted after the likelihood warm-up)")
    t.add_argument("--select", default=_TRAIN["select"], choices=["final", "best"],
                   help="model.pt: the last step's weights (final, the default: the learning "
                        "rate has decayed to --lr-final by then) or the best validation "
                        "objective after the likelihood warm-up (best, with early stopping)")
    t.add_argument("--lr-schedule", default=_TRAIN["lr_schedule"], choices=["cosine", "constant"],
                   help="cosine decay from --lr to --lr-final x --lr over the run (default), "
                        "or constant")
    t.add_argument("--lr-warmup", type=int, default=_TRAIN["lr_warmup"],
                   help="steps of linear learning-rate warm-up")
    t.add_argument("--lr-final", type=float, default=_TRAIN["lr_final"],
                   help="cosine: the last step's learning rate as a fraction of --lr")
    t.add_argument("--grad-clip", type=float, default=_TRAIN["grad_clip"],
                   help="clip the global gradient norm to this value")
    _add_model_arguments(t, IMAGE_MODEL_DATASETS)
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation and plots")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_objective_arguments(t) -> None:
    """``--method`` and one flag per option of the registered objectives (default None: an
    option left out takes the objective's default)."""
    t.add_argument("--method", default=None, choices=list(REGISTRY),
                   help=f"default {_TRAIN['method']}, fif for --model free-form; " +
                   "; ".join(f"{name}: {cls.summary or cls.__name__}"
                             for name, cls in REGISTRY.items()))
    uses: dict[str, list] = {}
    for method, cls in REGISTRY.items():
        for opt in cls.options:
            uses.setdefault(opt.name, []).append((method, opt))
    for name, declared in uses.items():
        first = declared[0][1]
        flags = [_flag(name)]
        for _, opt in declared:
            flags += [f for f in opt.flags if f not in flags]
        choices = None
        if all(opt.choices is not None for _, opt in declared):
            choices = list(dict.fromkeys(c for _, opt in declared for c in opt.choices))
        defaults = "; ".join(f"{m}: {o.default}" + (f" of {'/'.join(o.choices)}" if o.choices
                                                     else "") for m, o in declared)
        t.add_argument(*flags, dest=f"objective_{name}", default=None, choices=choices,
                       type=first.type, metavar=name.upper() if choices is None else None,
                       help=f"{first.help} (default {defaults})")


def method(args) -> str:
    """``--method``, or its default for ``--model``: fif for a free-form model (its own loss),
    else TrainConfig's."""
    if args.method is not None:
        return args.method
    return "fif" if args.model == "free-form" else _TRAIN["method"]


def objective_options(args) -> dict:
    """The options given on the command line for ``args.method``; an option of another method
    is refused, naming the methods that take it."""
    args.method = method(args)
    declared = {o.name for o in REGISTRY[args.method].options}
    given = {k[len("objective_"):]: v for k, v in vars(args).items()
             if k.startswith("objective_") and v is not None}
    for name in given:
        if name not in declared:
            takers = {m: o for m, cls in REGISTRY.items() for o in cls.options if o.name == name}
            flags = [_flag(name)] + [f for o in takers.values() for f in o.flags]
            raise SystemExit(f"injflow train: {' / '.join(dict.fromkeys(flags))} is not an "
                             f"option of --method {args.method}; it is for --method "
                             f"{' or '.join(takers)}")
    return given


def _add_model_arguments(t, image_sets) -> None:
    tab, img = tabular, images
    t.add_argument("--ambient-layers", type=positive_int, default=None,
                   help="tabular model: couplings of h (default: 8 for D <= 8, else 10)")
    t.add_argument("--ambient-hidden", type=_hidden, default=None,
                   help="tabular model: widths of h's conditioners (default: 64,64 for D <= 8, "
                        "else 128,128,128,128)")
    t.add_argument("--activation", default=None,
                   help=f"tabular model: the conditioners' activation (default "
                        f"{_default(tab, 'activation')})")
    t.add_argument("--permutation", default=None, choices=["random", "reverse"],
                   help=f"tabular model: the permutation after each coupling of h (default "
                        f"{_default(tab, 'permutation')})")
    t.add_argument("--image-levels", type=positive_int, default=None,
                   help=f"image model ({', '.join(image_sets)}): scales of h (a squeeze between "
                        f"them; default {_default(img, 'levels')})")
    t.add_argument("--image-couplings", type=positive_int, default=None,
                   help=f"image model: blocks per scale (ActNorm, 1x1 convolution, checkerboard "
                        f"coupling; default {_default(img, 'couplings')})")
    t.add_argument("--image-hidden", type=_hidden, default=None,
                   help=f"image model: channels of the couplings' 3x3 CNN conditioners (default "
                        f"{_widths(_default(img, 'hidden'))})")
    t.add_argument("--image-activation", default=None,
                   help=f"image model: the CNN conditioners' activation (default "
                        f"{_default(img, 'activation')})")
    ff, ffi = free_form, free_form_images
    t.add_argument("--free-form-hidden", type=_hidden, default=None,
                   help=f"free-form model: widths of the encoder's and decoder's fully connected "
                        f"layers (tabular: of each residual block, default "
                        f"{_widths(_default(ff, 'hidden'))}; images: after the CNN, default "
                        f"{_widths(_default(ffi, 'hidden'))})")
    t.add_argument("--free-form-blocks", type=int, default=None,
                   help=f"free-form tabular model: residual blocks of the encoder and of the "
                        f"decoder (default {_default(ff, 'blocks')})")
    t.add_argument("--free-form-channels", type=_hidden, default=None,
                   help=f"free-form image model: channels of the stride-2 convolutions (default "
                        f"{_widths(_default(ffi, 'channels'))})")
    t.add_argument("--free-form-activation", default=None,
                   help=f"free-form model: the networks' activation (default "
                        f"{_default(ff, 'activation')})")
    t.add_argument("--prior-layers", type=int, default=None,
                   help=f"blocks of the prior flow f (default {_default(tab, 'prior_layers')}; "
                        f"free-form: {_default(ff, 'prior_layers')}, FIF has none)")
    t.add_argument("--prior-hidden", type=_hidden, default=None,
                   help=f"widths of f's conditioners (default "
                        f"{_widths(_default(tab, 'prior_hidden'))})")
    t.add_argument("--prior-spline-bins", type=int, default=None,
                   help="an elementwise spline with this many bins in each prior block "
                        "(default 0: none)")
    t.add_argument("--coupling-scale", default=None, choices=["tanh", "exp"],
                   help="coupling log-scale: tanh(s) (bounded, default) or s")
    t.add_argument("--no-actnorm", dest="actnorm", action="store_const", const=False,
                   default=None, help="no ActNorm layers")
    t.add_argument("--base", default="normal", choices=["normal", "student-t"],
                   help="distribution of the latent z: normal (the paper's, default) or "
                        "student-t (heavier tails; --base-dof degrees of freedom)")
    t.add_argument("--base-dof", type=positive_int, default=None,
                   help=f"degrees of freedom of --base student-t (default "
                        f"{_default(StudentT, 'dof')})")
    t.add_argument("--logit", type=float, default=None, metavar="ALPHA",
                   help="pixel data in (0, 1): the model's last layer is x = (σ(y) − ALPHA) / "
                        "(1 − 2 ALPHA), the standardisation acts in logit space, densities stay "
                        "in pixel units (e.g. 0.05; default: none)")


def data_config(args) -> DataConfig:
    """The data of a new run from the flags (``--seed`` seeds the split too)."""
    return DataConfig(args.data, args.data_dir, args.n_samples, args.seed, args.standardize)


def build_model(args, data: Dataset, latent_dim: int, standardize: bool = True):
    """The model of a new run: of ``--model``'s kind, for images when the dataset says so
    (``data.model_shape``); the flags given, the builder's defaults for the rest; the data's
    standardisation inside it (``standardize``). A flag the builder does not take is refused,
    naming what it is for."""
    image = data.model_shape is not None
    builder = MODEL_KINDS[args.model][1 if image else 0]
    takes = _MODEL_FLAGS[builder]
    for dest in dict.fromkeys(d for flags in _MODEL_FLAGS.values() for d in flags):
        if dest in takes or getattr(args, dest) is None:
            continue
        kinds = [_DESCRIBED[b] for b, flags in _MODEL_FLAGS.items() if dest in flags]
        counterpart = _COUNTERPART.get(dest)
        raise SystemExit(f"injflow train: {_flag(dest)} applies to {' and '.join(kinds)} "
                         f"models, and {data.name} with --model {args.model} trains a "
                         f"{_DESCRIBED[builder]} model"
                         + (f"; use {_flag(counterpart)}" if counterpart in takes else ""))
    if args.base != "student-t" and args.base_dof is not None:
        raise SystemExit("injflow train: --base-dof is for --base student-t")
    sizes = {arg: getattr(args, dest) for dest, arg in takes.items()
             if getattr(args, dest) is not None}
    if not builder.startswith("free-form"):   # the rectangular builders' permutation seed
        sizes["seed"] = args.seed
    if args.base == "student-t":
        sizes["base"] = StudentT(latent_dim, args.base_dof or _default(StudentT, "dof"))
    try:
        return for_data(data.train, latent_dim, data.model_shape, standardize=standardize,
                        logit_alpha=args.logit, kind=args.model, **sizes)
    except ValueError as exc:
        raise SystemExit(f"injflow train: {exc}") from None


_LOOP_FIELDS = ("steps", "batch_size", "lr", "seed", "checkpoint_every", "patience", "select",
                "lr_schedule", "lr_warmup", "lr_final", "grad_clip", "precision")


def loop_options(args) -> dict:
    """The :class:`TrainConfig` fields of the loop from the flags (``device`` apart)."""
    opts = {k: getattr(args, k) for k in _LOOP_FIELDS}
    opts["epochs"] = args.epochs if args.epochs is not None else (
        None if args.steps else _TRAIN["epochs"])
    opts["likelihood_warmup"] = tuple(args.likelihood_warmup) if args.likelihood_warmup else None
    opts["step_mode"] = args.step_mode or _TRAIN["step_mode"]
    return opts
