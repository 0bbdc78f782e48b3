"""(a) The volume term and its gradient for your own decoder, in your own training loop.

An autoencoder of plain torch.nn modules learns a 1-D curve in R^3 and a density on it by
maximum likelihood on the manifold (RNF-ML): per point
    −log p(x) ≈ −log N(u; 0, I) + ½ log det(JᵀJ) + β‖x − g(u)‖²,   u = f(x),  J = ∂g/∂u.
`logdet_jtj(decoder, u, method)` gives the volume term: "exact" (the d Jacobian columns in one
pass through your decoder's tangent rules) or "hutchinson" (a stochastic estimate of its
gradient, for large d). Nothing else of the library is needed.

    python examples/volume_term_own_decoder.py [--method exact|hutchinson] [--steps 1500]
"""

import argparse
import math

import torch
from torch import nn

from injflow_ext.estimators import logdet_jtj

p = argparse.ArgumentParser()
p.add_argument("--method", default="exact", choices=["exact", "hutchinson"])
p.add_argument("--steps", type=int, default=1500)
p.add_argument("--beta", type=float, default=50.0)
args = p.parse_args()
torch.manual_seed(0)

# data: a helix in R^3, its parameter t ~ N(0, 1)
t = torch.randn(2000, 1)
data = torch.cat([torch.cos(2 * t), torch.sin(2 * t), 0.5 * t], dim=1)

d, D = 1, 3
encoder = nn.Sequential(nn.Linear(D, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, d))
decoder = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, D))
opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)


def log_normal(u):
    return -0.5 * (u ** 2).sum(-1) - 0.5 * u.shape[-1] * math.log(2 * math.pi)


for step in range(args.steps):
    x = data[torch.randint(0, len(data), (256,))]
    u = encoder(x)
    vol = logdet_jtj(decoder, u, args.method)   # .value (B,), .decoded = g(u) (B, D)
    reconstruction = ((x - vol.decoded) ** 2).sum(-1)
    loss = (-log_normal(u) + 0.5 * vol.value + args.beta * reconstruction).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 500 == 0 or step == args.steps - 1:
        print(f"step {step:5d}  loss {loss.item():8.3f}  "
              f"reconstruction {reconstruction.mean().item():.4f}")

# the exact log-density on the learned manifold, at the projections of the data
with torch.no_grad():
    x = data[:500]
    u = encoder(x)
    log_p = log_normal(u) - 0.5 * logdet_jtj(decoder, u, "exact").value
# the truth: p(x) = N(t; 0, 1) / |dx/dt| on the helix, |dx/dt| = √(4 + 0.25)
true = (log_normal(t[:500]) - 0.5 * math.log(4.25)).mean()
print(f"mean log-density on the manifold: learned {log_p.mean().item():.3f} nats, "
      f"true {true.item():.3f}")
