"""Benchmark: one RectangularFlow training step (loss forward + backward) at the paper's sizes,
ours against plain-PyTorch references on the same weights (docs/design.md §5, bench/RESULTS.md).

Methods: ours_exact, ours_hutchinson (K=1 probe, CG capped at d iterations), ours_surrogate
(the encoder-Jacobian surrogate, K=1 orthonormal probe), and from bench/plain_reference.py:
ref_one_tangent (d separate tangent passes, the paper's code style), ref_batched (primal once +
d tangents, eager), ref_jacfwd (torch.func.jacfwd under vmap), ref_hutchinson_cg (torch-ops
CG), ref_surrogate (the surrogate the way free-form injective flows write it: an autograd VJP
through a plain encoder and a plain tangent pass), and on CUDA ref_batched_graph (ref_batched
replayed from a CUDA graph) and ours_exact_graph / ours_hutchinson_graph /
ours_surrogate_graph (injflow_ext.TrainStep, mode "captured" without compiling: loss and
backward replayed from a CUDA graph). The compiled
variants run the loss through torch.compile first (inductor fuses the elementwise work between
the ops): ours_exact_compiled (TrainStep mode "compiled", CPU or CUDA),
ours_exact_compiled_graph (mode "captured", compiled) and, for a like-for-like
comparison, ref_batched_compiled and ref_batched_compiled_graph (the reference compiled the
same way, launched eagerly and captured).
Configs: the paper's tabular sizes (fully connected couplings), and MNIST_CONV, the
convolutional image model at MNIST size (28 × 28, d = 20, batch 64), whose plain references
run each CNN conditioner as one F.conv2d of the stacked primal and tangent images per layer.
Before timing, every exact method must give the same loss and gradients (checked in float64 on
a slice of the batch), and so must ours_surrogate and ref_surrogate on the same probes; each
compiled method's gradients must match ours_exact's (relative error <= 1e-9 in float64; in
float32 against the float64 gradients, <= 1e-4, 2e-3 with --tf32, or 4 × the rounding error of
the same code run eagerly in float32 where that is larger: an ill-conditioned gradient).

    python bench/step.py [--device cpu|cuda] [--configs MINIBOONE,HEPMASS] [--methods ...]
                         [--mlp-path auto|per_layer|fused] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_reference as ref  # noqa: E402
from common import add_common_args, environment, median_time, print_table, write_results  # noqa: E402

from injflow_ext import RectangularFlow, TrainStep  # noqa: E402
from injflow_ext.nn import set_mlp_path  # noqa: E402
from injflow_ext.ops import FusedMlp  # noqa: E402
from injflow_ext.ops.tangent import (  # noqa: E402
    FUSED_MATH,
    FUSED_PIPELINES,
    FUSED_WEIGHT_GRADS,
    MLP_PATHS,
)
from injflow_ext.train.objectives import (  # noqa: E402
    ExactObjective,
    HutchinsonObjective,
    SurrogateObjective,
)

CONFIGS = {  # name: (D, d, batch, hidden) or, for an image model, (image shape, d, batch, CNN widths)
    "POWER": (6, 2, 5000, (128,) * 4),
    "GAS": (8, 2, 2500, (128,) * 4),
    "HEPMASS": (21, 10, 750, (128,) * 4),
    "MINIBOONE": (43, 21, 400, (128,) * 4),
    "IMAGE": (784, 20, 50, (512,) * 2),
    # the convolutional image model of `injflow train --data mnist-5k` (RectangularFlow.images:
    # 2 scales of 4 CNN couplings of 32-32 channels) at MNIST size
    "MNIST_CONV": ((1, 28, 28), 20, 64, (32, 32)),
}
QUICK_CONFIGS = {"TINY": (6, 2, 64, (16,) * 2), "TINY_CONV": ((1, 8, 8), 3, 16, (8, 8))}
METHODS = ["ours_exact", "ours_hutchinson", "ours_surrogate", "ours_exact_graph",
           "ours_hutchinson_graph", "ours_surrogate_graph",
           "ref_one_tangent", "ref_batched", "ref_jacfwd", "ref_hutchinson_cg", "ref_surrogate",
           "ref_batched_graph",
           "ours_exact_compiled", "ref_batched_compiled", "ours_exact_compiled_graph",
           "ref_batched_compiled_graph"]
GRAPH_REFERENCES = ("ref_batched", "ref_batched_graph", "ref_batched_compiled_graph",
                    "ref_one_tangent")
COMPILED_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
# TF32 GEMMs round their operands to 10-bit mantissas (unit roundoff 2^-11 ~ 4.9e-4): two
# orderings of the same step then differ by ~1e-4 to 4e-4 in the gradient (measured on an
# H100: 1.2e-4 to 3.5e-4), where float32 orderings differ by ~1e-7
TF32_TOLERANCE = 2e-3
EXACT = ["ours_exact", "ref_one_tangent", "ref_batched", "ref_jacfwd"]
BETA = ExactObjective.defaults()["beta"]


def build_model(D, d, hidden, device, dtype, seed=0):
    """The fully connected model of the paper's tabular runs (D an int), or for D = (C, H, W)
    the image model of ``RectangularFlow.images`` with ``hidden`` its CNN widths."""
    torch.manual_seed(seed)
    if isinstance(D, tuple):
        model = RectangularFlow.images(D, d, levels=2, couplings=4, hidden=hidden,
                                           prior_layers=5, prior_hidden=(32, 32), seed=seed)
    else:
        model = RectangularFlow.tabular(D, d, ambient_layers=10, ambient_hidden=hidden, prior_layers=5,
                                prior_hidden=(32, 32), actnorm=True, seed=seed)
    model = model.to(device=device, dtype=dtype)
    x = make_batch(256, model.ambient_dim, device, dtype, seed)
    model.initialize(x)  # data-dependent ActNorm initialisation
    with torch.no_grad():  # move off the identity initialisation of the couplings
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def make_batch(B, D, device, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, generator=g) * 0.5).to(device=device, dtype=dtype)


def loss_fn(method, model, x, gen):
    if method == "ours_exact":
        return ExactObjective(beta=BETA).loss(model, x)["loss"]
    if method == "ours_hutchinson":
        return HutchinsonObjective(beta=BETA).loss(model, x, generator=gen)["loss"]
    if method == "ours_surrogate":
        return SurrogateObjective(beta=BETA).loss(model, x, generator=gen)["loss"]
    if method == "ref_one_tangent":
        return ref.exact_one_tangent(model, x, BETA)
    if method in ("ref_batched", "ref_batched_graph"):
        return ref.exact_batched(model, x, BETA)
    if method == "ref_jacfwd":
        return ref.exact_jacfwd(model, x, BETA)
    if method == "ref_hutchinson_cg":
        return ref.hutchinson_cg(model, x, BETA, generator=gen)
    if method == "ref_surrogate":
        return ref.encoder_surrogate(model, x, BETA, generator=gen)
    raise ValueError(method)


def check_surrogates_agree(model, x, methods):
    """ours_surrogate and ref_surrogate on the same probes (same generator seed), float64:
    loss and gradients to rounding."""
    if not {"ours_surrogate", "ref_surrogate"} <= set(methods):
        return None
    m64 = model.to(torch.float64)
    x64 = x[:16].to(torch.float64)
    params = list(m64.parameters())
    out = {}
    for method in ("ours_surrogate", "ref_surrogate"):
        gen = torch.Generator(device=x.device).manual_seed(0)
        loss = loss_fn(method, m64, x64, gen)
        out[method] = (loss.detach(), torch.autograd.grad(loss, params, allow_unused=True))
    model.to(x.dtype)
    (la, ga), (lb, gb) = out["ours_surrogate"], out["ref_surrogate"]
    ga = [torch.zeros_like(p) if g is None else g for g, p in zip(ga, params)]
    gb = [torch.zeros_like(p) if g is None else g for g, p in zip(gb, params)]
    err = max(float((la - lb).abs() / lb.abs().clamp(min=1e-12)), gradient_rel_err(ga, gb))
    if err > 1e-7:
        raise AssertionError(f"ours_surrogate disagrees with ref_surrogate: rel err {err:.2e}")
    return err


def check_exact_methods_agree(model, x, methods):
    """Loss and gradients of every exact method in float64 on the same batch."""
    m64 = model.to(torch.float64)
    x64 = x[:16].to(torch.float64)
    params = list(m64.parameters())
    results = {}
    for method in methods:
        if method not in EXACT:
            continue
        loss = loss_fn(method, m64, x64, None)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results[method] = (loss.detach(), [torch.zeros_like(p) if g is None else g
                                           for g, p in zip(grads, params)])
    model.to(x.dtype)
    if len(results) < 2:
        return 0.0   # nothing to compare (the compiled methods are checked on their own)
    base_loss, base_grads = results["ours_exact"] if "ours_exact" in results else \
        next(iter(results.values()))
    worst = 0.0
    for method, (loss, grads) in results.items():
        rel_grad = gradient_rel_err(grads, base_grads)
        rel_loss = float((loss - base_loss).abs() / base_loss.abs().clamp(min=1e-12))
        worst = max(worst, rel_grad, rel_loss)
        if rel_loss > 1e-8 or rel_grad > 1e-7:
            raise AssertionError(f"{method} disagrees with ours_exact: loss rel err "
                                 f"{rel_loss:.2e}, gradient rel err {rel_grad:.2e}")
    return worst


def gradient_rel_err(grads, expected) -> float:
    """``‖grads − expected‖ / ‖expected‖`` over all parameters together."""
    num = sum(((a - b) ** 2).sum() for a, b in zip(grads, expected)) ** 0.5
    den = sum((b ** 2).sum() for b in expected) ** 0.5
    return float(num / den)


def clear_grads(model):
    for p in model.parameters():
        p.grad = None


def step_gradients(model, x, fn):
    """The gradients of one eager step ``fn(model, x).backward()`` (left cleared)."""
    clear_grads(model)
    fn(model, x).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    clear_grads(model)
    return grads


def ours_exact_loss(model, x):
    return ExactObjective(beta=BETA).loss(model, x)["loss"]


def ref_exact_loss(model, x):
    return ref.exact_batched(model, x, BETA)


def float64_gradients(model, x, fn):
    """:func:`step_gradients` with the model and batch in float64 (the model is put back in
    its dtype): the yardstick against which the rounding of a float32 step is judged."""
    dtype = next(model.parameters()).dtype
    grads = step_gradients(model.to(torch.float64), x.to(torch.float64), fn)
    model.to(dtype)
    return grads


def check_gradients_match(method, model, expected, rounding=0.0):
    """The gradients a compiled method left in ``p.grad`` against ``expected``: within the
    dtype's tolerance, or, where the float32 gradient is ill-conditioned (``expected`` then in
    float64), within 4 × ``rounding``, the error of the same code run eagerly in float32 (the
    image model at MNIST size: eager float32 is 2.6e-3 from float64 for ours, 4.4e-2 for the
    plain reference, so no reordering of its float32 arithmetic can meet 1e-4)."""
    err = gradient_rel_err([p.grad.to(expected[0].dtype) for p in model.parameters()], expected)
    tol = COMPILED_TOLERANCE[next(model.parameters()).dtype]
    if expected[0].is_cuda and next(model.parameters()).dtype == torch.float32 and \
            torch.backends.cuda.matmul.allow_tf32:
        tol = TF32_TOLERANCE
    tol = max(tol, 4 * rounding)
    if not err <= tol:
        raise AssertionError(f"{method} disagrees with ours_exact: gradient rel err {err:.2e} "
                             f"> {tol:.1e}")
    return err


def capture_reference(model, x, fn):
    """``fn(model, x)`` (a loss) and its backward recorded in a CUDA graph; the replay."""
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            clear_grads(model)
            fn(model, static_x, BETA).backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    clear_grads(model)
    with torch.cuda.graph(graph, stream=s):  # its own stream (see TrainStep._capture)
        fn(model, static_x, BETA).backward()
    return graph.replay


def make_step(method, model, x, device, checks=None):
    """A zero-argument callable running one step (loss forward + backward) of ``method`` on
    ``x``; None for a graph method off CUDA. A compiled method's gradients are checked against
    ours_exact's first (the error goes to ``checks[method]``)."""
    if method.endswith("_graph") and device.type != "cuda":
        return None
    if "compiled" in method:
        if x.dtype == torch.float32:    # judge against float64, allowing the eager rounding
            fn = ref_exact_loss if method.startswith("ref_") else ours_exact_loss
            expected = float64_gradients(model, x, fn)
            rounding = gradient_rel_err([g.double() for g in step_gradients(model, x, fn)],
                                        expected)
            if checks is not None:
                checks[f"{method}_eager_float32_vs_float64"] = rounding
        else:
            expected, rounding = step_gradients(model, x, ours_exact_loss), 0.0
        if method.startswith("ref_"):
            compiled = torch.compile(ref.exact_batched, dynamic=False)
            if method.endswith("_graph"):
                step = capture_reference(model, x, compiled)
            else:
                def step():
                    clear_grads(model)
                    compiled(model, x, BETA).backward()
        else:   # the library's training step, loss and backward only (no optimiser)
            train_step = TrainStep(model, ExactObjective(beta=BETA), update=False,
                                   mode="captured" if method.endswith("_graph") else "compiled",
                                   example_x=x)
            step = lambda: train_step(x)  # noqa: E731
        for _ in range(2):   # TrainStep's first eager step runs uncompiled
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        err = check_gradients_match(method, model, expected, rounding)
        if checks is not None:
            checks[method] = err
        return step
    if method in ("ours_exact_graph", "ours_hutchinson_graph", "ours_surrogate_graph"):
        objective = {"ours_exact_graph": ExactObjective, "ours_hutchinson_graph":
                     HutchinsonObjective, "ours_surrogate_graph": SurrogateObjective}[method](
                         beta=BETA)
        train_step = TrainStep(model, objective, update=False, mode="captured", compile=False,
                               example_x=x)
        return lambda: train_step(x)
    if method == "ref_batched_graph":
        return capture_reference(model, x, ref.exact_batched)
    gen = torch.Generator(device=device).manual_seed(0)

    def eager_step():
        clear_grads(model)
        loss_fn(method, model, x, gen).backward()
    return eager_step


def time_method(method, model, x, device, budget, checks=None):
    step = make_step(method, model, x, device, checks)
    if step is None:
        return None, None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = median_time(step, device, budget_s=budget, min_repeats=3, max_repeats=30, warmup=2)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return t, peak


def write_partial(args, device, env, rows, final=False):
    """The JSON of the rows so far (``complete`` False until the last config is done)."""
    write_results(args, "step", device, {
        "environment": env, "tf32": args.tf32, "mlp_path": args.mlp_path,
        "mlp_math": args.mlp_math, "mlp_pipeline": args.mlp_pipeline,
        "mlp_wgrad": args.mlp_wgrad, "complete": final,
        "metric": "median ms of one loss forward + backward", "beta": BETA, "rows": rows},
        quiet=not final)


def add_arithmetic_args(p) -> None:
    """The options that choose how ours computes (also bench/profile_step.py's): --mlp-path,
    --mlp-math, --mlp-pipeline and --mlp-wgrad (set on the model with ``set_mlp_path``) and
    --tf32 (``allow_tf32`` for the run)."""
    p.add_argument("--mlp-path", default="auto", choices=list(MLP_PATHS),
                   help="the conditioners' tangent_mlp path for the ours_* methods (fused: "
                        "CUDA only)")
    p.add_argument("--mlp-math", default=FusedMlp.math, choices=list(FUSED_MATH),
                   help="with --mlp-path fused: the fused kernels' float32 arithmetic (auto: "
                        "follow --tf32, as cuBLAS does; tf32x3: 3xTF32, float32-accurate on "
                        "the tensor cores)")
    p.add_argument("--mlp-pipeline", default=FusedMlp.pipeline, choices=list(FUSED_PIPELINES),
                   help="with --mlp-path fused: how the fused kernels stage the weights "
                        "(async: cp.async into three shared-memory buffers, sm_80+)")
    p.add_argument("--mlp-wgrad", default=FusedMlp.weight_grads,
                   choices=list(FUSED_WEIGHT_GRADS),
                   help="with --mlp-path fused: the backward's weight gradients by one cuBLAS "
                        "GEMM per layer or by one split-K kernel for every layer")
    p.add_argument("--tf32", action="store_true",
                   help="let float32 GEMMs use TF32 tensor cores (CUDA; every method alike)")


def fused_options(args) -> FusedMlp:
    """The fused kernels' options of --mlp-math, --mlp-pipeline and --mlp-wgrad."""
    return FusedMlp(math=args.mlp_math, pipeline=args.mlp_pipeline, weight_grads=args.mlp_wgrad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--configs", default=None, help="comma-separated names of " + ",".join(CONFIGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per method")
    add_arithmetic_args(p)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.configs:
        configs = {k: CONFIGS[k] for k in args.configs.split(",")}
    methods = args.methods.split(",")
    env = environment(device)
    rows = []
    for name, (D, d, B, hidden) in configs.items():
        model = build_model(D, d, hidden, device, dtype)
        set_mlp_path(model, args.mlp_path, fused_options(args))
        D = model.ambient_dim
        x = make_batch(B, D, device, dtype)
        worst = check_exact_methods_agree(model, x, methods)
        surrogate_agreement = check_surrogates_agree(model, x, methods)
        checks = {}
        row = {"config": name, "D": D, "d": d, "batch": B, "exact_agreement": worst,
               "surrogate_agreement": surrogate_agreement,
               "compiled_gradient_rel_err": checks}
        for method in methods:
            try:
                t, peak = time_method(method, model, x, device,
                                      0.3 if args.quick else args.budget, checks)
            except Exception as e:  # one broken method must not lose the other methods' rows
                if args.quick:
                    raise
                print(f"  {name} {method}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                row[f"{method}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                t, peak = None, None
                if device.type == "cuda":
                    torch.cuda.synchronize()
            row[f"{method}_ms"] = t
            row[f"{method}_peak_mib"] = peak
            if t is not None:
                print(f"  {name} {method}: {t:.2f} ms", flush=True)
            # what is measured so far, in case a time limit stops the run
            write_partial(args, device, env, rows + [row])
        diag = HutchinsonObjective(beta=BETA).loss(model, x)["diagnostics"]
        row["ours_cg_iterations_mean"] = float(diag["cg_iterations"].float().mean())
        row["ours_cg_converged_fraction"] = float(diag["cg_converged"].float().mean())
        _, it = ref.hutchinson_cg(model, x, BETA, return_iterations=True)
        row["ref_cg_iterations"] = it
        for method in methods:
            if method != "ours_exact" and "surrogate" not in method and \
                    row.get(f"{method}_ms") and row.get("ours_exact_ms"):
                row[f"exact_speedup_vs_{method}"] = row[f"{method}_ms"] / row["ours_exact_ms"]
        if row.get("ref_hutchinson_cg_ms") and row.get("ours_hutchinson_ms"):
            row["hutchinson_speedup_vs_ref"] = row["ref_hutchinson_cg_ms"] / row["ours_hutchinson_ms"]
        if row.get("ours_surrogate_ms"):
            for m in ("ours_exact", "ours_hutchinson", "ref_surrogate", "ref_batched"):
                if row.get(f"{m}_ms"):
                    row[f"surrogate_speedup_vs_{m}"] = row[f"{m}_ms"] / row["ours_surrogate_ms"]
        if row.get("ours_exact_graph_ms"):   # the GPU targets compare the captured steps too
            for m in GRAPH_REFERENCES:
                if row.get(f"{m}_ms"):
                    row[f"exact_graph_speedup_vs_{m}"] = row[f"{m}_ms"] / row["ours_exact_graph_ms"]
        for m in ("ref_batched", "ref_batched_compiled"):
            if row.get("ours_exact_compiled_ms") and row.get(f"{m}_ms"):
                row[f"compiled_speedup_vs_{m}"] = row[f"{m}_ms"] / row["ours_exact_compiled_ms"]
        if row.get("ours_exact_compiled_graph_ms"):
            for m in GRAPH_REFERENCES:
                if row.get(f"{m}_ms"):
                    row[f"compiled_graph_speedup_vs_{m}"] = (row[f"{m}_ms"]
                                                             / row["ours_exact_compiled_graph_ms"])
        if row.get("ours_hutchinson_graph_ms") and row.get("ref_hutchinson_cg_ms"):
            row["hutchinson_graph_speedup_vs_ref"] = (row["ref_hutchinson_cg_ms"]
                                                      / row["ours_hutchinson_graph_ms"])
        rows.append(row)
    write_partial(args, device, env, rows, final=True)
    print(f"\ntraining step (loss forward + backward), {args.dtype}{' (TF32 GEMMs)' if args.tf32 else ''}, "
          f"conditioners: tangent_mlp path {args.mlp_path}, "
          f"{env['device_name']}, torch "
          f"{env['torch_version']} (median ms)")
    cols = [("config", "config", "s"), ("D", "D", "d"), ("d", "d", "d"), ("batch", "batch", "d")]
    cols += [(f"{m}_ms", m, ".1f") for m in methods]
    print_table(rows, cols)
    print("\nratios (reference / ours; exact references against ours_exact, "
          "Hutchinson against ours_hutchinson)")
    rcols = [("config", "config", "s")]
    rcols += [(f"exact_speedup_vs_{m}", f"vs {m}", ".2f") for m in methods
              if m.startswith("ref_") and m not in ("ref_hutchinson_cg", "ref_surrogate")]
    if "ours_exact_compiled" in methods:
        rcols += [("compiled_speedup_vs_ref_batched", "compiled vs ref_batched", ".2f"),
                  ("compiled_speedup_vs_ref_batched_compiled", "compiled vs ref_batched_compiled",
                   ".2f")]
    rcols += [(f"surrogate_speedup_vs_{m}", f"surrogate vs {m}", ".2f")
              for m in ("ours_exact", "ours_hutchinson", "ref_surrogate", "ref_batched")
              if m in methods and "ours_surrogate" in methods]
    rcols += [("hutchinson_speedup_vs_ref", "hutch vs ref", ".2f"),
              ("ours_cg_iterations_mean", "CG it ours", ".1f"), ("ref_cg_iterations", "CG it ref", "d")]
    print_table(rows, rcols)
    if any(r.get("ours_exact_graph_ms") or r.get("ours_exact_compiled_graph_ms") for r in rows):
        print("\nratios of the captured steps (reference / ours_*_graph)")
        gcols = [("config", "config", "s")]
        gcols += [(f"exact_graph_speedup_vs_{m}", f"exact graph vs {m}", ".2f")
                  for m in GRAPH_REFERENCES]
        gcols += [(f"compiled_graph_speedup_vs_{m}", f"compiled graph vs {m}", ".2f")
                  for m in GRAPH_REFERENCES]
        gcols += [("hutchinson_graph_speedup_vs_ref", "hutch graph vs ref", ".2f")]
        print_table(rows, gcols)


if __name__ == "__main__":
    main()
