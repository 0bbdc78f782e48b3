"""Benchmark: your own networks at full speed.

1. ``logdet_jtj(plain_module, u)``, exact and Hutchinson (K = 1), forward + backward: the tangent
   rules of injflow_ext.nn.tangent (a run of Linear + activation is one ``tangent_mlp``, a
   convolution one ``tangent_conv2d``) against the generic path every other callable takes
   (``torch.func``: ``vmap(jacfwd)`` for the exact Jacobian, ``torch.func.jvp`` per probe in
   Hutchinson's CG), on an MLP decoder (d = 21, D = 43, 4 × 128 tanh, B = 400: MINIBOONE's
   sizes) and a convolutional decoder (FreeFormFlow.images's, 1 × 16 × 16, d = 8).
2. One FIF training loss + backward: ``FifObjective`` against the plain-PyTorch loss as
   vislearn/FFF computes it (injflow_ext.benchmarks.fif_reference: forward-mode dual numbers
   for g′v, a double backward for vᵀf′), on FreeFormFlow.mlp(43, 21) and the image model.

Before timing, each pair is checked to agree in float64 (values and parameter gradients, the
same probes); the script stops if not. Times are interleaved (A B A B ...) and the speed-up is
the median of per-round ratios with a 95 % interval.

    python bench/free_form.py [--device cpu|cuda] [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_common_args,
    environment,
    paired_ratio_interval,
    print_table,
    times_interleaved,
    write_results,
)

from injflow_ext import FifObjective, FreeFormFlow  # noqa: E402
from injflow_ext.benchmarks.fif_reference import fif_reference_loss  # noqa: E402
from injflow_ext.estimators import logdet_jtj, orthonormal_probes  # noqa: E402


def mlp_decoder(d=21, D=43, width=128, depth=4):
    layers, n = [], d
    for _ in range(depth):
        layers += [nn.Linear(n, width), nn.Tanh()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, D))


def conv_decoder(d=8):
    return FreeFormFlow.images((1, 16, 16), d, channels=(16, 32), hidden=(64,)).decoder_net


def _grads(value, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(value, params, allow_unused=True))]


def _close(a, b):
    return float(max((x - y).abs().max() / (y.abs().max() + 1e-30) for x, y in zip(a, b)))


def logdet_pair(net, d, B, method, device, dtype):
    """(fast, generic) closures of logdet_jtj + backward, after a float64 agreement check."""
    def run(decoder, u, seed, **kw):
        res = logdet_jtj(decoder, u, method, generator=torch.Generator(device).manual_seed(seed),
                         **kw)
        return res.value.sum()
    # the check runs CG to convergence (at the cap of d iterations an ill-conditioned JᵀJ
    # leaves a residual that the two paths' rounding moves by ~1e-4)
    tight = {"cg_rtol": 1e-13, "cg_max_iter": 500} if method == "hutchinson" else {}
    check = copy.deepcopy(net).to(device, torch.float64)
    u64 = torch.randn(8, d, dtype=torch.float64, device=device)
    params = list(check.parameters())
    fast = _grads(run(check, u64, 0, **tight), params)
    generic = _grads(run(lambda z: check(z).flatten(1), u64, 0, **tight), params)
    agreement = _close(fast, generic)
    if agreement > 1e-6:
        raise SystemExit(f"free_form.py: the fast and generic logdet_jtj({method}) gradients "
                         f"differ by {agreement:.2e}; not timing")
    net = net.to(device, dtype)
    u = torch.randn(B, d, dtype=dtype, device=device, requires_grad=True)

    def fast_step():
        run(net, u, 1).backward()

    def generic_step():
        run(lambda z: net(z).flatten(1), u, 1).backward()
    return fast_step, generic_step, agreement


def fif_pair(model, B, device, dtype):
    """(ours, reference) closures of one FIF loss + backward, after a float64 check."""
    obj = FifObjective()
    check = copy.deepcopy(model).to(device, torch.float64)
    x64 = torch.randn(8, model.ambient_dim, dtype=torch.float64, device=device)
    params = list(check.parameters())
    ours = _grads(obj.loss(check, x64, generator=torch.Generator(device).manual_seed(0))["loss"],
                  params)
    v = orthonormal_probes(8, 1, model.latent_dim, x64, torch.Generator(device).manual_seed(0))
    flat_dec = check.decoder

    def encode(x):
        return check.encoder(x)
    ref = _grads(fif_reference_loss(x64, encode, flat_dec, check.prior_log_prob, obj.beta, v),
                 params)
    agreement = _close(ours, ref)
    if agreement > 1e-8:
        raise SystemExit(f"free_form.py: FifObjective and the FFF reference differ by "
                         f"{agreement:.2e}; not timing")
    model = model.to(device, dtype)
    x = torch.randn(B, model.ambient_dim, dtype=dtype, device=device)
    gen = torch.Generator(device).manual_seed(1)
    v = orthonormal_probes(B, 1, model.latent_dim, x, gen)

    def ours_step():
        obj.loss(model, x, generator=gen)["loss"].backward()

    def ref_step():
        fif_reference_loss(x, model.encoder, model.decoder, model.prior_log_prob, obj.beta,
                           v).backward()
    return ours_step, ref_step, agreement


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; the issue's figures use 1)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 3.0)
    torch.manual_seed(0)
    B_mlp, B_conv, B_fif = (32, 8, 32) if args.quick else (400, 64, 400)
    cases = []
    for name, net, d, B in (("mlp decoder 21->4x128 tanh->43", mlp_decoder(), 21, B_mlp),
                            ("conv decoder 8->1x16x16", conv_decoder(), 8, B_conv)):
        for method in ("exact", "hutchinson"):
            fast, generic, agreement = logdet_pair(copy.deepcopy(net), d, B, method, device,
                                                   dtype)
            cases.append((f"logdet_jtj {method}: {name}, B={B}", fast, generic, agreement,
                          "rules", "torch.func"))
    for name, model in (("FIF step: FreeFormFlow.mlp(43, 21)", FreeFormFlow.mlp(43, 21)),
                        ("FIF step: FreeFormFlow.images((1,16,16), 8)",
                         FreeFormFlow.images((1, 16, 16), 8, channels=(16, 32), hidden=(64,)))):
        B = B_fif if "mlp" in name else B_conv
        ours, ref, agreement = fif_pair(model, B, device, dtype)
        cases.append((f"{name}, B={B}", ours, ref, agreement, "ours", "FFF reference"))
    rows = []
    for label, fast, slow, agreement, fast_name, slow_name in cases:
        t_fast, t_slow = times_interleaved([fast, slow], device, budget_s=budget,
                                           min_repeats=3 if args.quick else 7)
        ratio, low, high = paired_ratio_interval(t_slow, t_fast)
        rows.append({"case": label, "ours": fast_name, "baseline": slow_name,
                     "ours_ms": sorted(t_fast)[len(t_fast) // 2],
                     "baseline_ms": sorted(t_slow)[len(t_slow) // 2],
                     "speedup": ratio, "speedup_low": low, "speedup_high": high,
                     "rounds": len(t_fast), "float64_agreement": agreement})
    print(f"device {device}, {args.dtype}, {torch.get_num_threads()} thread(s)")
    print_table(rows, [("case", "case", "s"), ("ours_ms", "ours ms", ".2f"),
                       ("baseline_ms", "baseline ms", ".2f"), ("speedup", "speed-up", ".2f"),
                       ("speedup_low", "95% low", ".2f"), ("speedup_high", "95% high", ".2f"),
                       ("baseline", "baseline", "s")])
    write_results(args, "free_form", device, {"environment": environment(device),
                                              "threads": torch.get_num_threads(),
                                              "cases": rows})


if __name__ == "__main__":
    main()
