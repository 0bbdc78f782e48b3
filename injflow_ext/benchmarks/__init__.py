"""``injflow bench``: measure this machine with the installed package alone (no checkout).

Ours against plain PyTorch in the same run, each checked to agree before it is timed:
- ``gram_logdet`` against ``torch.logdet(JᵀJ)``, forward + backward;
- a coupling conditioner (``tangent_mlp``) against the plain primal-plus-tangents MLP
  (:func:`plain_reference.plain_tangent_mlp`), forward + backward;
- a RectangularFlow training step (loss and backward) of ``TrainStep`` against the plain
  batched-tangent reference step (:func:`plain_reference.exact_batched`), eager, and on CUDA
  also both replayed from a CUDA graph.
Times are medians of CUDA-event timings (host clock on the CPU). The bench/ scripts of the
repository go further (more methods and sizes, compiled references, profiles).

``mlp_path`` picks the conditioners' ``tangent_mlp`` path of ours (``fused``: the CUDA kernels
that keep a whole conditioner on chip) and ``precision="tf32"`` runs every float32 GEMM, ours
and plain, on TF32 tensor cores (cuBLAS and the fused kernels), so a cluster user can measure
both on their GPU with the wheel alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from ..flows import RectangularFlow
from ..nn import set_mlp_path
from ..ops import gram_logdet, tangent_mlp
from ..ops.tangent import MLP_PATHS, FusedMlp
from ..train.objectives import BETA as _BETA_OPTION
from ..train.objectives import ExactObjective
from ..train.step import TrainStep, matmul_precision
from . import plain_reference
from .timing import environment, median_time, print_table, write_json

__all__ = ["run_bench", "STEP_CONFIGS"]

BETA = _BETA_OPTION.default
# name: (D, d, batch, hidden) — the paper's tabular sizes (bench/step.py has more)
STEP_CONFIGS = {"HEPMASS": (21, 10, 750, (128,) * 4), "MINIBOONE": (43, 21, 400, (128,) * 4)}
QUICK_STEP_CONFIGS = {"TINY": (6, 2, 64, (16,) * 2)}


def _rel_err(a, b) -> float:
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float((y ** 2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-30)


def capture_replay(fn, device):
    """``fn()`` recorded in a CUDA graph after warm-up on a side stream; the replay. The
    capture runs on the warm-up's stream (every per-stream resource, such as the cuBLAS
    workspaces of this thread and the autograd engine's, exists before it; no other graph
    shares the stream, see TrainStep._capture) and is thread-local (other threads' work
    cannot invalidate it): a first capture failed on an H200 without these
    (bench/RESULTS.md), and a failed capture leaves torch's CUDA generator unusable."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        fn()
    return graph.replay


def _time(fn, device, budget):
    return median_time(fn, device, budget_s=budget, min_repeats=5, max_repeats=200)


def _gram_case(B, D, d, device, dtype, budget) -> dict:
    J = (torch.randn(B, D, d, dtype=dtype, device=device)).requires_grad_()

    def ours():
        return torch.autograd.grad(gram_logdet(J).sum(), J)[0]

    def plain():
        return torch.autograd.grad(torch.logdet(J.mT @ J).sum(), J)[0]

    err = _rel_err([ours()], [plain()])
    t_ours, t_plain = _time(ours, device, budget), _time(plain, device, budget)
    return {"op": "gram_logdet", "case": f"B={B} D={D} d={d}", "plain_ms": t_plain,
            "ours_ms": t_ours, "speedup": t_plain / t_ours, "rel_err": err}


def bench_gram_logdet(device, dtype, budget, quick) -> list:
    cases = [(64, 8, 2)] if quick else [(400, 43, 21), (5000, 8, 2)]
    return [_gram_case(B, D, d, device, dtype, budget) for B, D, d in cases]


def bench_tangent_mlp(device, dtype, budget, quick, mlp_path="auto", fused=None) -> list:
    cases = [(64, 3, [3, 16, 16, 6])] if quick else [(400, 21, [21, 128, 128, 128, 128, 44]),
                                                      (750, 10, [10, 128, 128, 128, 128, 22])]
    g = torch.Generator().manual_seed(0)
    return [_mlp_case(B, K, widths, g, device, dtype, budget, mlp_path, fused)
            for B, K, widths in cases]


def _mlp_case(B, K, widths, g, device, dtype, budget, mlp_path, fused) -> dict:
    XV = torch.randn(B, 1 + K, widths[0], generator=g).to(device, dtype).requires_grad_()
    Ws = [(torch.randn(b, a, generator=g) / math.sqrt(a)).to(device, dtype).requires_grad_()
          for a, b in zip(widths[:-1], widths[1:])]
    bs = [(0.1 * torch.randn(b, generator=g)).to(device, dtype).requires_grad_()
          for b in widths[1:]]
    G = torch.randn(B, 1 + K, widths[-1], generator=g).to(device, dtype)
    params = [XV, *Ws, *bs]

    def step(fn):
        return lambda: torch.autograd.grad((fn(XV, Ws, bs) * G).sum(), params)

    def ours_fn(x, w, b):
        return tangent_mlp(x, w, b, "tanh", path=mlp_path, fused=fused)

    ours, plain = step(ours_fn), step(plain_reference.plain_tangent_mlp)
    err = _rel_err(ours(), plain())
    row = {"op": "tangent_mlp", "case": f"B={B} K={K} widths={'-'.join(map(str, widths))}",
           "plain_ms": _time(plain, device, budget), "ours_ms": _time(ours, device, budget),
           "rel_err": err}
    row["speedup"] = row["plain_ms"] / row["ours_ms"]
    if device.type == "cuda":
        row["plain_graph_ms"] = _time(capture_replay(plain, device), device, budget)
        row["ours_graph_ms"] = _time(capture_replay(ours, device), device, budget)
        row["graph_speedup"] = row["plain_graph_ms"] / row["ours_graph_ms"]
    return row


def _clear(model):
    for p in model.parameters():
        p.grad = None


def bench_step(device, dtype, budget, quick, mlp_path="auto", fused=None) -> list:
    configs = QUICK_STEP_CONFIGS if quick else STEP_CONFIGS
    return [_step_case(name, *cfg, device, dtype, budget, mlp_path, fused)
            for name, cfg in configs.items()]


def _step_case(name, D, d, B, hidden, device, dtype, budget, mlp_path, fused) -> dict:
    torch.manual_seed(0)
    model = RectangularFlow.tabular(D, d, ambient_layers=10, ambient_hidden=hidden, prior_layers=5,
                            prior_hidden=(32, 32)).to(device=device, dtype=dtype)
    set_mlp_path(model, mlp_path, fused)   # ours; the plain reference does not use the MLP ops
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(B, D, generator=g) * 0.5).to(device=device, dtype=dtype)
    model.initialize(x)   # ActNorm initialisation
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    params = list(model.parameters())
    eager = TrainStep(model, ExactObjective(beta=BETA), update=False)

    def ours():
        eager(x)

    def plain():
        _clear(model)
        plain_reference.exact_batched(model, x, BETA).backward()

    ours()
    ours_grads = [p.grad.clone() for p in params]
    plain()
    err = _rel_err(ours_grads, [p.grad for p in params])
    row = {"config": name, "D": D, "d": d, "batch": B, "grad_rel_err": err,
           "plain_ms": _time(plain, device, budget), "ours_ms": _time(ours, device, budget)}
    row["speedup"] = row["plain_ms"] / row["ours_ms"]
    if device.type == "cuda":
        captured = TrainStep(model, ExactObjective(beta=BETA), update=False, mode="captured",
                             compile=False, example_x=x)
        row["ours_graph_ms"] = _time(lambda: captured(x), device, budget)
        _clear(model)
        row["plain_graph_ms"] = _time(capture_replay(plain, device), device, budget)
        row["graph_speedup"] = row["plain_graph_ms"] / row["ours_graph_ms"]
    return row


def run_bench(device="cpu", dtype=torch.float32, quick=False, budget=None,
              json_path: str | None = None, verbose: bool = True, mlp_path: str = "auto",
              precision: str | None = None, fused: FusedMlp | None = None) -> dict:
    """Run every benchmark on ``device``; print the tables (``verbose``) and write JSON to
    ``json_path``. Returns the results. Raises if ours and plain PyTorch disagree (relative
    error above 1e-3 in float32, 1e-2 with TF32, 1e-8 in float64), before anything is reported
    as a speed-up. ``mlp_path``: ours' conditioner path ("auto", "per_layer", "fused" (CUDA));
    ``precision``: None (torch's setting), "float32" or "tf32", the float32 GEMMs of ours and
    of plain PyTorch alike (CUDA; :func:`injflow_ext.train.step.matmul_precision`, which checks it);
    ``fused``: the fused kernels' options (:class:`~injflow_ext.ops.FusedMlp`; with
    ``mlp_path="fused"`` only; None: their defaults)."""
    device = torch.device(device)
    if mlp_path not in MLP_PATHS:
        raise ValueError(f"injflow bench: mlp_path must be one of {list(MLP_PATHS)}, got "
                         f"{mlp_path!r}")
    if mlp_path == "fused" and device.type != "cuda":
        raise ValueError(f"injflow bench: mlp_path='fused' runs the CUDA kernels; got device "
                         f"{device} (use --device cuda, or --mlp-path auto on the CPU)")
    if fused is not None and mlp_path != "fused":
        raise ValueError(f"injflow bench: fused options are for the fused kernels; they need "
                         f"mlp_path='fused', got {mlp_path!r}")
    budget = budget if budget is not None else (0.2 if quick else 1.0)
    # two TF32 computations of the same thing differ by TF32's rounding (2^-11 per operand)
    tf32 = precision == "tf32" and device.type == "cuda" and dtype == torch.float32
    tol = (1e-2 if tf32 else 1e-3) if dtype == torch.float32 else 1e-8
    with matmul_precision(precision):
        ops = bench_gram_logdet(device, dtype, budget, quick) + \
            bench_tangent_mlp(device, dtype, budget, quick, mlp_path, fused)
        steps = bench_step(device, dtype, budget, quick, mlp_path, fused)
    for r in ops + steps:
        err = r.get("rel_err", r.get("grad_rel_err"))
        if not err <= tol:
            raise AssertionError(f"injflow bench: ours and plain PyTorch disagree on "
                                 f"{r.get('op', r.get('config'))} {r.get('case', '')}: "
                                 f"relative error {err:.2e} > {tol:.0e}")
    env = environment(device)
    result = {"benchmark": "injflow bench", "dtype": str(dtype).replace("torch.", ""),
              "mlp_path": mlp_path, "fused": None if fused is None else asdict(fused),
              "precision": precision,
              "tf32": tf32,
              "environment": env, "metric": "median ms of forward + backward",
              "ops": ops, "step": steps}
    if verbose:
        print(f"\nops, forward + backward, {result['dtype']}{' (TF32 GEMMs)' if tf32 else ''}, "
              f"{env['device_name']}, torch {env['torch_version']}, conditioners {mlp_path} "
              f"(median ms; speedup = plain / ours)")
        cols = [("op", "op", "s"), ("case", "case", "s"), ("plain_ms", "plain", ".3f"),
                ("ours_ms", "ours", ".3f"), ("speedup", "speedup", ".2f")]
        if device.type == "cuda":
            cols += [("plain_graph_ms", "plain graph", ".3f"), ("ours_graph_ms", "ours graph",
                                                                ".3f"),
                     ("graph_speedup", "graph speedup", ".2f")]
        print_table(ops, cols + [("rel_err", "rel err", ".1e")])
        print("\ntraining step (exact loss + backward; ours = TrainStep, plain = the batched-"
              "tangent reference)")
        cols = [("config", "config", "s"), ("batch", "batch", "d"), ("plain_ms", "plain", ".2f"),
                ("ours_ms", "ours", ".2f"), ("speedup", "speedup", ".2f")]
        if device.type == "cuda":
            cols += [("plain_graph_ms", "plain graph", ".2f"),
                     ("ours_graph_ms", "ours graph", ".2f"),
                     ("graph_speedup", "graph speedup", ".2f")]
        print_table(steps, cols + [("grad_rel_err", "grad rel err", ".1e")])
    if json_path:
        write_json(json_path, result, quiet=not verbose)
    return result
