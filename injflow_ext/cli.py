"""``injflow`` command line: train, eval, ood, sample, bench (also ``python -m injflow_ext``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from . import train_options
from ._io import atomic_json
from .data import DataConfig, Dataset, load_dataset
from .train.runs import load_run, read_config, write_config
from .train_options import positive_int

__all__ = ["main", "load_run"]


def _device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("injflow: --device cuda but no GPU is visible to torch")
    return name


def cmd_train(args) -> int:
    """``injflow train``; under ``torchrun --nproc-per-node N`` every process runs this, trains
    its share of each batch through DistributedDataParallel, and rank 0 writes the run."""
    from .train.distributed import init_from_env

    dist = init_from_env(_device(args.device))
    try:
        return _train(args, dist)
    finally:
        dist.close()


def _train(args, dist) -> int:
    from . import build_info
    from .flows import from_config
    from .train.loop import TrainConfig, objective_of

    device = args.device
    data_change = None   # (fingerprint the run started on, now) when --allow-data-change
    if args.resume:
        # everything but the device comes from the run directory: --out RUN --resume suffices
        if not args.out:
            raise SystemExit("injflow train: --resume needs --out RUN_DIR")
        out = args.out
        saved = read_config(out)
        data_cfg = DataConfig.from_dict(saved["data"])
        data_cfg.data_dir = args.data_dir or data_cfg.data_dir   # the files may have moved
        args.seed = data_cfg.seed
        args.dtype = saved.get("dtype", args.dtype)  # a float64 run resumes in float64
        data = data_cfg.load()
        started_on, now = data_cfg.fingerprint, data_cfg.fingerprint_of(data)
        if started_on is not None and not DataConfig.same_data(started_on, now):
            if not args.allow_data_change:
                raise SystemExit(
                    f"injflow train: the training data of {out} changed since the run started; "
                    f"resume on the data it started on, or pass --allow-data-change to go on "
                    f"with the new data (the run then records the change).\n  started on: "
                    f"{json.dumps(started_on)}\n  now:        {json.dumps(now)}")
            data_change = (started_on, now)
        model = from_config(saved["model"])
        train = dict(saved["train"], device=device)
        if args.step_mode is not None:
            train["step_mode"] = args.step_mode
        if args.precision is not None:
            train["precision"] = args.precision
        tcfg = TrainConfig.from_dict(train)
    else:
        data_cfg = train_options.data_config(args)
        data = data_cfg.load()
        data_cfg.fingerprint = data_cfg.fingerprint_of(data)
        d = args.latent_dim or data.latent_dim
        if d is None:
            raise SystemExit(f"injflow train: --latent-dim is required for {args.data} (its "
                             "manifold dimension is not known)")
        if d >= data.dim:
            raise SystemExit(f"injflow train: --latent-dim must be smaller than the data "
                             f"dimension {data.dim}, got {d}")
        args.method = train_options.method(args)
        out = args.out or os.path.join("runs", f"{os.path.basename(data.name)}-{args.method}")
        if os.path.exists(os.path.join(out, "checkpoint.pt")) and not args.overwrite:
            raise SystemExit(f"injflow train: {out} already holds a run; use --resume to continue "
                             "it, --overwrite to start again, or another --out")
        objective_options = train_options.objective_options(args)
        torch.manual_seed(args.seed)
        model = train_options.build_model(args, data, d, data_cfg.standardize)
        tcfg = TrainConfig(method=args.method, objective=objective_options,
                           **train_options.loop_options(args), device=device)
        try:
            tcfg.validate()
            objective_of(tcfg).check_model(model)
        except ValueError as exc:
            raise SystemExit(f"injflow train: {exc}") from None
    # the lock before anything of the run is written (it also refuses --overwrite of a run
    # being trained), released however the run ends
    lock = _lock_run(out, dist)
    try:
        if dist.is_main and data_change is not None:
            print(f"injflow train: going on with changed training data (--allow-data-change); "
                  f"recorded in {out}/config.json", file=sys.stderr, flush=True)
            data_cfg.fingerprint = data_change[1]
            saved.setdefault("data_changes", []).append(
                {"from": data_change[0], "to": data_change[1],
                 "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            write_config(out, {**saved, "data": data_cfg.stored().to_dict()})
        elif dist.is_main and not args.resume:
            _write_config(out, args, data_cfg, model, tcfg, build_info,
                          world_size=dist.world_size)
        return _run(args, dist, out, model, data, tcfg)
    finally:
        lock.release()


def _lock_run(out: str, dist):
    """Rank 0 takes the run directory's lock (train/lock.py); every rank learns whether it
    could, and all refuse together when not."""
    from .train.lock import RunLock, RunLocked
    lock, error = RunLock(out), None
    if dist.is_main:
        try:
            lock.acquire()
        except RunLocked as exc:
            error = str(exc)
    if dist.sum({"refused": 1.0 if error else 0.0})["refused"]:
        raise SystemExit(f"injflow train: {error or 'rank 0 could not take the lock of ' + out}")
    return lock


def _run(args, dist, out, model, data, tcfg) -> int:
    """Train (the run directory locked), then rank 0 reports."""
    from .train.loop import Trainer
    from .train.preemption import INTERRUPTED_EXIT, Stopped

    if args.dtype == "float64":
        model = model.double()
    trainer = Trainer(model, data.train, data.val, tcfg, out, progress=not args.quiet, dist=dist)
    try:
        summary = trainer.run(resume=args.resume)
    except Stopped as stopped:   # SIGTERM, SIGUSR1 or SIGINT: checkpoint written
        if dist.is_main:
            print(f"\ninjflow train: {stopped}; continue with: injflow train --out {out} "
                  "--resume", file=sys.stderr, flush=True)
        return stopped.exit_status
    except KeyboardInterrupt:
        if dist.is_main:
            print(f"\ninterrupted at step {trainer.step}; checkpoint written to "
                  f"{trainer.checkpoint_path}; continue with: injflow train --out {out} --resume",
                  file=sys.stderr)
        return INTERRUPTED_EXIT
    if not dist.is_main:
        return 0
    return _report(args, summary, out, data, tcfg)


def _write_config(out, args, data_cfg, model, tcfg, build_info, world_size):
    os.makedirs(out, exist_ok=True)
    write_config(out, {"data": data_cfg.stored().to_dict(),
                       "model": model.config, "train": asdict(tcfg), "build_info": build_info(),
                       "dtype": args.dtype, "torch_version": torch.__version__,
                       "world_size": world_size,
                       "command": " ".join(sys.argv)})


def _report(args, summary, out, data, tcfg) -> int:
    """Rank 0 after training: evaluation, metrics.json, plots, and what it printed."""
    from .evaluate.evaluation import evaluate
    from .evaluate.plots import make_plots
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
    try:
        plots = make_plots(model, data, out)
    except Exception as exc:   # a figure never throws away a finished training
        plots = []
        print(f"injflow train: the plots were not drawn ({type(exc).__name__}: {exc}); the "
              f"model, checkpoint and metrics are in {out}",
              file=sys.stderr)
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
    """The run's test data, or ``--data`` (another set of the same dimension) split alike."""
    cfg = DataConfig.from_dict(read_config(run_dir)["data"])
    other = args.data is not None and args.data != cfg.name
    return DataConfig(args.data if other else cfg.name, args.data_dir or cfg.data_dir,
                      None if other else cfg.n_samples, cfg.seed).load()


def cmd_eval(args) -> int:
    from .evaluate.evaluation import evaluate
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
    from .evaluate.evaluation import ood_summary, per_sample_scores
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
        from .evaluate.plots import plot_ood_scores
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
              json_path=path, mlp_path=args.mlp_path, precision=args.precision)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="injflow", description="Train and evaluate rectangular "
                                "(injective) normalizing flows.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model; writes a run directory with config, logs, "
                       "checkpoints, metrics and plots")
    train_options.add_arguments(t)
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
    s.add_argument("-n", type=positive_int, default=1000, help="number of samples (>= 1)")
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
    try:
        return args.func(args)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        print(f"injflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
