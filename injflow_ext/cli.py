"""``injflow`` command line: train, eval, ood, sample, bench (also ``python -m injflow_ext``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import numpy as np
import torch

from ._io import atomic_json
from .data import DATASET_NAMES, IMAGE_MODEL_DATASETS, Dataset, load_dataset
from .models import RectangularFlow, default_ambient_size
from .runs import load_run, read_config, write_config

__all__ = ["main", "load_run"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _warmup_value(text: str) -> str:
    """A likelihood warm-up point: steps ("500") or a percentage of the run ("25%")."""
    from .training import warmup_steps
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


def _device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("injflow: --device cuda but no GPU is visible to torch")
    return name


def cmd_train(args) -> int:
    """``injflow train``; under ``torchrun --nproc-per-node N`` every process runs this, trains
    its share of each batch through DistributedDataParallel, and rank 0 writes the run."""
    from .distributed import init_from_env

    dist = init_from_env(_device(args.device))
    try:
        return _train(args, dist)
    finally:
        dist.close()


def _train(args, dist) -> int:
    from . import build_info
    from .training import TrainConfig, Trainer

    device = args.device
    if args.resume:
        # everything but the device comes from the run directory: --out RUN --resume suffices
        if not args.out:
            raise SystemExit("injflow train: --resume needs --out RUN_DIR")
        out = args.out
        saved = read_config(out)
        saved_data = saved["data"]
        args.data, args.seed = saved_data["name"], saved_data["seed"]
        args.data_dir = args.data_dir or saved_data.get("data_dir")
        args.n_samples = saved_data.get("n_samples")
        args.dtype = saved.get("dtype", args.dtype)  # a float64 run resumes in float64
        data = load_dataset(args.data, seed=args.seed, data_dir=args.data_dir,
                            n_samples=args.n_samples)
        model = RectangularFlow(**saved["model"])
        train = dict(saved["train"])
        train["likelihood_warmup"] = (tuple(train["likelihood_warmup"])
                                      if train.get("likelihood_warmup") else None)
        train["device"] = device
        # runs written before these options existed trained with these
        train.setdefault("select", "best")
        train.setdefault("lr_schedule", "constant")
        if args.step_mode is not None:
            train["step_mode"] = args.step_mode
        if args.precision is not None:
            train["precision"] = args.precision
        tcfg = TrainConfig(**train)
    else:
        data = load_dataset(args.data, seed=args.seed, data_dir=args.data_dir,
                            n_samples=args.n_samples)
        d = args.latent_dim or data.latent_dim
        if d is None:
            raise SystemExit(f"injflow train: --latent-dim is required for {args.data} (its "
                             "manifold dimension is not known)")
        if d >= data.dim:
            raise SystemExit(f"injflow train: --latent-dim must be smaller than the data "
                             f"dimension {data.dim}, got {d}")
        out = args.out or os.path.join("runs", f"{os.path.basename(data.name)}-{args.method}")
        if os.path.exists(os.path.join(out, "checkpoint.pt")) and not args.overwrite:
            raise SystemExit(f"injflow train: {out} already holds a run; use --resume to continue "
                             "it, --overwrite to start again, or another --out")
        shift = scale = None
        train_x = data.train
        if args.logit is not None:     # standardise in logit space, where h's output lives
            if not 0 <= args.logit < 0.5:
                raise SystemExit(f"injflow train: --logit ALPHA must be in [0, 0.5), got "
                                 f"{args.logit}")
            if data.train.min() <= 0 or data.train.max() >= 1:
                raise SystemExit(f"injflow train: --logit needs data in (0, 1) (dequantised "
                                 f"pixels); {data.name} spans [{data.train.min():.3g}, "
                                 f"{data.train.max():.3g}]")
            p = args.logit + (1 - 2 * args.logit) * data.train
            train_x = np.log(p) - np.log1p(-p)
        image_model = os.path.basename(data.name) in IMAGE_MODEL_DATASETS
        if args.standardize and image_model:
            # one mean and std over all pixels: per pixel, MNIST's near-constant border pixels
            # would be blown up into unit-variance noise that h must carry like the strokes
            shift = np.full(data.dim, train_x.mean())
            scale = np.full(data.dim, train_x.std())
        elif args.standardize:
            shift = train_x.mean(0)
            scale = train_x.std(0) + 1e-6 * (np.abs(train_x).max() + 1e-12)
        torch.manual_seed(args.seed)
        layers, hidden = default_ambient_size(data.dim)
        if image_model:
            model = RectangularFlow.for_images(
                (1, *data.image_shape), d, levels=args.image_levels,
                couplings=args.image_couplings, hidden=args.image_hidden,
                prior_layers=args.prior_layers, prior_hidden=args.prior_hidden,
                base=args.base, base_dof=args.base_dof, seed=args.seed, data_shift=shift,
                data_scale=scale, logit_alpha=args.logit)
        else:
            model = RectangularFlow(data.dim, d, ambient_layers=args.ambient_layers or layers,
                                    ambient_hidden=args.ambient_hidden or hidden,
                                    prior_layers=args.prior_layers,
                                    prior_hidden=args.prior_hidden,
                                    prior_spline_bins=args.prior_spline_bins,
                                    activation=args.activation,
                                    scale=args.coupling_scale, actnorm=args.actnorm,
                                    permutation=args.permutation, base=args.base,
                                    base_dof=args.base_dof, seed=args.seed, data_shift=shift,
                                    data_scale=scale, logit_alpha=args.logit)
        if args.surrogate_noise and args.method != "surrogate":
            raise SystemExit("injflow train: --surrogate-noise is for --method surrogate")
        if not args.surrogate_noise >= 0:
            raise SystemExit(f"injflow train: --surrogate-noise must be >= 0, got "
                             f"{args.surrogate_noise}")
        if args.probe == "orthonormal" and args.method != "surrogate":
            raise SystemExit("injflow train: --probe orthonormal is for --method surrogate; "
                             "hutchinson takes normal or rademacher")
        if args.method == "surrogate" and (args.probe or "orthonormal") == "orthonormal" \
                and args.hutchinson_samples > d:
            raise SystemExit(f"injflow train: --probe orthonormal needs --probes K <= d = {d}, "
                             f"got {args.hutchinson_samples}")
        tcfg = TrainConfig(method=args.method, hutchinson_samples=args.hutchinson_samples,
                           probe=args.probe, surrogate_noise=args.surrogate_noise,
                           beta=args.beta, epochs=args.epochs, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr,
                           likelihood_warmup=tuple(args.likelihood_warmup)
                           if args.likelihood_warmup else None, seed=args.seed, device=device,
                           checkpoint_every=args.checkpoint_every, patience=args.patience,
                           select=args.select, lr_schedule=args.lr_schedule,
                           lr_warmup=args.lr_warmup, lr_final=args.lr_final,
                           grad_clip=args.grad_clip,
                           step_mode=args.step_mode or "auto", precision=args.precision)
        tcfg.validate()
        dist.barrier()  # every rank has checked for an existing run before rank 0 writes one
        if dist.is_main:
            _write_config(out, args, data, model, tcfg, build_info, world_size=dist.world_size)
    if args.dtype == "float64":
        model = model.double()
    trainer = Trainer(model, data.train, data.val, tcfg, out, progress=not args.quiet, dist=dist)
    try:
        summary = trainer.run(resume=args.resume)
    except KeyboardInterrupt:
        if dist.is_main:
            print(f"\ninterrupted at step {trainer.step}; checkpoint written to "
                  f"{trainer.checkpoint_path}; continue with: injflow train --out {out} --resume",
                  file=sys.stderr)
        return 130
    if not dist.is_main:
        return 0
    return _report(args, summary, out, data, tcfg)


def _stored_path(path):
    """A data file or folder as config.json stores it: absolute, so that a run resumes from any
    working directory; dataset names stay names."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def _write_config(out, args, data, model, tcfg, build_info, world_size):
    os.makedirs(out, exist_ok=True)
    write_config(out, {"data": {"name": _stored_path(args.data),
                                "data_dir": _stored_path(args.data_dir),
                                "n_samples": args.n_samples, "seed": args.seed,
                                "standardize": args.standardize, "dim": data.dim},
                       "model": model.config, "train": asdict(tcfg), "build_info": build_info(),
                       "dtype": args.dtype, "torch_version": torch.__version__,
                       "world_size": world_size,
                       "command": " ".join(sys.argv)})


def _report(args, summary, out, data, tcfg) -> int:
    """Rank 0 after training: evaluation, metrics.json, plots, and what it printed."""
    from .evaluation import evaluate
    from .plots import make_plots
    chosen = (f"model.pt: the best validation objective {summary['best_val_objective']:.4g} "
              f"at epoch {summary['best_epoch']}" if tcfg.select == "best"
              else "model.pt: the final weights")
    print(f"trained {summary['steps']} steps ({summary['epochs']:.1f} epochs) in "
          f"{summary['wall_time_s']:.1f} s; {chosen}")
    if args.no_eval:
        atomic_json({"train": summary}, os.path.join(out, "metrics.json"))
        return 0
    model = load_run(out, map_location=args.device)
    metrics = evaluate(model, data, seed=args.seed)
    atomic_json({"train": summary, "test": metrics, "data": data.name, "method": tcfg.method},
                os.path.join(out, "metrics.json"))
    plots = make_plots(model, data, out)
    _print_metrics(metrics)
    print(f"run directory: {out}")
    for p in plots:
        print(f"  plot: {p}")
    return 0


def _print_metrics(m: dict) -> None:
    names = {"test_log_likelihood": "test log-likelihood (nats, on the manifold; mean)",
             "reconstruction": "reconstruction error (mean ‖x − proj(x)‖²)",
             "frechet_distance": "Fréchet distance (samples vs test)",
             "kl_divergence": "KL(true ‖ model) on the true manifold's chart"}
    for k, label in names.items():
        if m.get(k) is not None:
            print(f"  {label}: {m[k]:.4f}")
        if k == "test_log_likelihood" and m.get("test_log_likelihood_median") is not None:
            print(f"    median {m['test_log_likelihood_median']:.4f}, 5% quantile "
                  f"{m['test_log_likelihood_q05']:.4f}, min {m['test_log_likelihood_min']:.4g}; "
                  f"{m['test_log_likelihood_below_floor']} of {m['n_test']} points below "
                  f"{m['test_log_likelihood_floor']:g}, {m['test_log_likelihood_nonfinite']} "
                  "non-finite")
        if k == "kl_divergence" and m.get(k) is not None:
            print(f"    true mass where the model's density is below 1e-4 (tears): "
                  f"{m['tear_mass']:.2%}; binning error ≈ {m['kl_discretisation']:.1e}")
    if m.get("test_bits_per_dim") is not None:
        print(f"  bits per dimension (on the manifold, grey-level units): mean "
              f"{m['test_bits_per_dim']:.4f}, median {m['test_bits_per_dim_median']:.4f}")
    if "fid" in m:
        print(f"  FID: {m['fid']:.2f}" if m["fid"] is not None else
              f"  FID: not computed ({m['fid_unavailable']})")


def _data_of_run(run_dir: str, args) -> Dataset:
    cfg = read_config(run_dir)["data"]
    name = args.data or cfg["name"]
    return load_dataset(name, seed=cfg["seed"], data_dir=args.data_dir or cfg.get("data_dir"),
                        n_samples=cfg.get("n_samples") if name == cfg["name"] else None)


def cmd_eval(args) -> int:
    from .evaluation import evaluate
    model = load_run(args.run, map_location=_device(args.device))
    data = _data_of_run(args.run, args)
    if data.dim != model.ambient_dim:
        raise SystemExit(f"injflow eval: the data has {data.dim} features, the model "
                         f"{model.ambient_dim}")
    metrics = evaluate(model, data)
    path = os.path.join(args.run, "metrics.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    atomic_json({**old, "test": metrics, "data": data.name}, path)
    _print_metrics(metrics)
    print(f"wrote {path}")
    return 0


def cmd_ood(args) -> int:
    from .evaluation import ood_summary, per_sample_scores
    model = load_run(args.run, map_location=_device(args.device))
    run_data = read_config(args.run)["data"]
    seed = run_data["seed"]
    args.in_data = args.in_data or run_data["name"]
    x_in = load_dataset(args.in_data, seed=seed, data_dir=args.data_dir).test
    x_out = load_dataset(args.out_data, seed=seed, data_dir=args.data_dir).test
    for name, x in (("--in-data", x_in), ("--out-data", x_out)):
        if x.shape[1] != model.ambient_dim:
            raise SystemExit(f"injflow ood: {name} has {x.shape[1]} features, the model "
                             f"{model.ambient_dim}")
    s_in, s_out = per_sample_scores(model, x_in), per_sample_scores(model, x_out)
    rep = {"in_data": args.in_data, "out_data": args.out_data, **ood_summary(s_in, s_out)}
    stem = f"ood_{os.path.basename(args.out_data)}"
    path = os.path.join(args.run, f"{stem}.json")
    atomic_json(rep, path)
    if not args.no_plot:
        from .plots import plot_ood_scores
        print(f"  plot: {plot_ood_scores(s_in, s_out, args.in_data, args.out_data, args.run, f'{stem}.png')}")
    for score in ("log_likelihood", "reconstruction"):
        print(f"  {score}: AUROC {rep[score]['auroc']:.3f}, decision-stump accuracy "
              f"{rep[score]['stump_accuracy']:.3f}")
    print(f"wrote {path}")
    return 0


def cmd_sample(args) -> int:
    model = load_run(args.run, map_location=_device(args.device))
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    x = model.sample(args.n, generator=g).cpu().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.save(args.out, x)
    print(f"wrote {args.n} samples of shape {tuple(x.shape[1:])} to {args.out}")
    return 0


def cmd_bench(args) -> int:
    """``injflow bench``: ours against plain PyTorch on this machine (injflow_ext.benchmarks)."""
    from .benchmarks import run_bench
    device = _device(args.device)
    path = args.json or f"injflow-bench-{device}.json"
    run_bench(device, getattr(torch, args.dtype), quick=args.quick, budget=args.budget,
              json_path=path, mlp_path=args.mlp_path, precision=args.precision,
              mlp_pipeline=args.mlp_pipeline, mlp_wgrad=args.mlp_wgrad)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="injflow", description="Train and evaluate rectangular "
                                "(injective) normalizing flows.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model; writes a run directory with config, logs, "
                       "checkpoints, metrics and plots")
    t.add_argument("--data", default=None,
                   help=f"dataset name ({', '.join(DATASET_NAMES)}) or a .npy/.csv file (N × D)")
    t.add_argument("--data-dir", default=None, help="folder of the tabular/image data files")
    t.add_argument("--n-samples", type=_positive_int, default=None,
                   help="use at most this many points")
    t.add_argument("--latent-dim", type=_positive_int, default=None,
                   help="manifold dimension d (default: known for synthetic data)")
    t.add_argument("--method", default="exact",
                   choices=["exact", "hutchinson", "surrogate", "two-step"],
                   help="exact: RNF-ML, exact volume-term gradient (1 + d rows per sample); "
                        "hutchinson: Hutchinson probes + CG; surrogate: the encoder-Jacobian "
                        "surrogate (1 + K rows and K encoder backward passes, no CG; biased "
                        "where the encoder is not the pseudo-inverse); two-step: RNF-TS")
    t.add_argument("--probes", "--hutchinson-samples", dest="hutchinson_samples",
                   type=_positive_int, default=1,
                   help="probes K per sample of hutchinson and surrogate (default 1)")
    t.add_argument("--probe", default=None, choices=["normal", "rademacher", "orthonormal"],
                   help="kind of probe: hutchinson normal (default) or rademacher; surrogate "
                        "orthonormal (default; K <= d), normal or rademacher")
    t.add_argument("--surrogate-noise", type=float, default=0.0, metavar="SIGMA",
                   help="surrogate: the encoder sees x + SIGMA·N(0, I) and reconstructs x (a "
                        "denoising reconstruction that makes the encoder's Jacobian the "
                        "pseudo-inverse, where the surrogate is exact); data units, default 0")
    t.add_argument("--beta", type=float, default=50.0, help="weight of the reconstruction term")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=_positive_int, default=None)
    g.add_argument("--steps", type=_positive_int, default=None)
    t.add_argument("--batch-size", type=_positive_int, default=200,
                   help="global batch; under torchrun each of the N processes trains on 1/N of it")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--likelihood-warmup", type=_warmup_value, nargs=2, metavar=("START", "END"),
                   default=None, help="likelihood weight 0 before START, 1 after END: steps "
                   "(500) or percentages of the run (25%%)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
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
    t.add_argument("--overwrite", action="store_true", help="start again in an existing --out")
    t.add_argument("--checkpoint-every", type=_positive_int, default=500)
    t.add_argument("--patience", type=int, default=20,
                   help="--select best: stop after this many epochs without validation "
                        "improvement (counted after the likelihood warm-up)")
    t.add_argument("--select", default="final", choices=["final", "best"],
                   help="model.pt: the last step's weights (final, the default: the learning "
                        "rate has decayed to --lr-final by then) or the best validation "
                        "objective after the likelihood warm-up (best, with early stopping)")
    t.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                   help="cosine decay from --lr to --lr-final x --lr over the run (default), "
                        "or constant")
    t.add_argument("--lr-warmup", type=int, default=0,
                   help="steps of linear learning-rate warm-up")
    t.add_argument("--lr-final", type=float, default=0.0,
                   help="cosine: the last step's learning rate as a fraction of --lr")
    t.add_argument("--grad-clip", type=float, default=None,
                   help="clip the global gradient norm to this value")
    t.add_argument("--ambient-layers", type=_positive_int, default=None,
                   help="couplings of h (default: 8 for D <= 8, else 10)")
    t.add_argument("--ambient-hidden", type=_hidden, default=None,
                   help="widths of h's conditioners (default: 64,64 for D <= 8, else "
                        "128,128,128,128)")
    t.add_argument("--prior-layers", type=int, default=5)
    t.add_argument("--prior-hidden", type=_hidden, default=(32, 32))
    t.add_argument("--logit", type=float, default=None, metavar="ALPHA",
                   help="pixel data in (0, 1): the model's last layer is x = (σ(y) − ALPHA) / "
                        "(1 − 2 ALPHA), the standardisation acts in logit space, densities stay "
                        "in pixel units (e.g. 0.05; default: none)")
    t.add_argument("--image-levels", type=_positive_int, default=2,
                   help=f"image model ({', '.join(IMAGE_MODEL_DATASETS)}): scales of h (a "
                        "squeeze between them; default 2)")
    t.add_argument("--image-couplings", type=_positive_int, default=4,
                   help="image model: blocks per scale (ActNorm, 1x1 convolution, checkerboard "
                        "coupling; default 4)")
    t.add_argument("--image-hidden", type=_hidden, default=[32, 32],
                   help="image model: channels of the couplings' 3x3 CNN conditioners "
                        "(default 32,32)")
    t.add_argument("--base", default="normal", choices=["normal", "student-t"],
                   help="distribution of the latent z: normal (the paper's, default) or "
                        "student-t (heavier tails; --base-dof degrees of freedom)")
    t.add_argument("--base-dof", type=_positive_int, default=3,
                   help="degrees of freedom of --base student-t (default 3)")
    t.add_argument("--prior-spline-bins", type=int, default=0,
                   help="an elementwise spline with this many bins in each prior block (0: none)")
    t.add_argument("--activation", default="tanh")
    t.add_argument("--coupling-scale", default="tanh", choices=["tanh", "exp"],
                   help="coupling log-scale: tanh(s) (bounded) or s")
    t.add_argument("--permutation", default="random", choices=["random", "reverse"],
                   help="permutation after each coupling of h")
    t.add_argument("--no-actnorm", dest="actnorm", action="store_false",
                   help="no ActNorm layers")
    t.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="train on the raw data (default: a fixed per-feature standardisation "
                        "(image models: one mean and std over all pixels) "
                        "layer inside the model)")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation and plots")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run on its test data; writes RUN/metrics.json")
    e.add_argument("run")
    e.add_argument("--data", default=None, help="another dataset of the same dimension")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e.set_defaults(func=cmd_eval)

    o = sub.add_parser("ood", help="out-of-distribution detection scores of a run")
    o.add_argument("run")
    o.add_argument("--in-data", default=None,
                   help="in-distribution data (default: the run's training data); its test split "
                        "is scored")
    o.add_argument("--out-data", required=True,
                   help="out-of-distribution data with as many features (e.g. digits-28 for a "
                        "mnist-5k run); its test split is scored")
    o.add_argument("--data-dir", default=None)
    o.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    o.add_argument("--no-plot", action="store_true", help="no histogram of the scores")
    o.set_defaults(func=cmd_ood)

    s = sub.add_parser("sample", help="draw samples from a run's model into a .npy file")
    s.add_argument("run")
    s.add_argument("-n", type=_positive_int, default=1000, help="number of samples (>= 1)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.set_defaults(func=cmd_sample)

    b = sub.add_parser("bench", help="time the ops and a training step against plain PyTorch "
                       "on this machine; prints tables and writes JSON")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    b.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    b.add_argument("--quick", action="store_true", help="tiny sizes, short timing")
    b.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per method (default 1, --quick 0.2)")
    b.add_argument("--mlp-path", default="auto", choices=["auto", "per_layer", "fused"],
                   help="the conditioners' tangent_mlp path of ours (fused: the CUDA kernels "
                        "that keep a whole conditioner on chip)")
    b.add_argument("--mlp-pipeline", default=None, choices=["registers", "async"],
                   help="with --mlp-path fused: how the fused kernels stage their weights "
                        "(async: cp.async into three shared-memory buffers, sm_80+; default: "
                        "registers, or INJFLOW_MLP_PIPELINE)")
    b.add_argument("--mlp-wgrad", default=None, choices=["cublas", "kernel"],
                   help="with --mlp-path fused: how the backward computes the weight gradients "
                        "(kernel: one split-K kernel for every layer; default: cublas, one GEMM "
                        "per layer, or INJFLOW_MLP_WGRAD)")
    b.add_argument("--precision", default=None, choices=["float32", "tf32"],
                   help="CUDA: the float32 GEMMs of ours and plain PyTorch alike; tf32 = TF32 "
                        "tensor cores (cuBLAS and the fused kernels). Default: torch's setting")
    b.add_argument("--json", default=None, help="output JSON (default injflow-bench-DEVICE.json)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and not args.data and not args.resume:
        parser.error("train: --data is required (unless --resume)")
    if args.command == "train" and args.epochs is None and args.steps is None:
        args.epochs = 50
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as exc:
        print(f"injflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
