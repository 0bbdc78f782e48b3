"""(b) A free-form injective flow on your own data, from Python.

FreeFormFlow(encoder, decoder, latent_dim) takes any encoder R^D → R^d and decoder R^d → R^D
(plain torch.nn modules; a run of Linear + activation layers gets the fused tangent kernels) and
trains with FIF's loss (objective "fif": reconstruction + the encoder-side volume surrogate),
or with the exact volume term of the decoder ("exact"). Then: log_prob (the exact change of
variables of the decoder at f(x)), sample, encode/decode/project, save and load.

    python examples/free_form_own_data.py [--method fif|exact] [--steps 2000]
"""

import argparse
import os
import tempfile

import numpy as np
import torch
from torch import nn

from injflow_ext import FreeFormFlow, TrainStep
from injflow_ext.nn import Residual

p = argparse.ArgumentParser()
p.add_argument("--method", default="fif", choices=["fif", "exact", "hutchinson"])
p.add_argument("--steps", type=int, default=2000)
args = p.parse_args()
torch.manual_seed(0)

# your data: a noisy 2-D sheet (a paraboloid patch) in R^5, as a numpy array
rng = np.random.default_rng(0)
ab = rng.normal(size=(4000, 2))
sheet = np.stack([ab[:, 0], ab[:, 1], 0.3 * (ab ** 2).sum(1), np.sin(ab[:, 0]),
                  ab[:, 0] * ab[:, 1] / 3], axis=1)
data = torch.tensor(sheet + 0.01 * rng.normal(size=sheet.shape), dtype=torch.float32)

D, d, w = 5, 2, 128


def block():   # x + MLP(x): FIF's ResNet block
    return Residual(nn.Sequential(nn.Linear(D, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(),
                                  nn.Linear(w, D)))


encoder = nn.Sequential(block(), block(), nn.Linear(D, d))
decoder = nn.Sequential(nn.Linear(d, D), block(), block())
model = FreeFormFlow(encoder, decoder, latent_dim=d)       # base: standard normal
step = TrainStep(model, args.method, lr=1e-3)              # options: make_objective(...)

for i in range(args.steps):
    out = step(data[torch.randint(0, len(data), (256,))])
    if i % 500 == 0 or i == args.steps - 1:
        print(f"step {i:5d}  loss {float(out['loss']):8.3f}  "
              f"reconstruction {float(out['reconstruction']):.4f}")

model.eval()
test = data[:1000]
with torch.no_grad():
    log_p = model.log_prob(test)                 # (B,) nats on the learned manifold
    samples = model.sample(5)                    # (5, D)
    off = ((test - model.project(test)) ** 2).sum(-1).mean()
print(f"test log-likelihood {log_p.mean().item():.3f}, projection error {off.item():.4f}")
print("samples:\n", samples.numpy().round(3))

# a model you composed yourself saves its state_dict; your code rebuilds it
path = os.path.join(tempfile.mkdtemp(), "free_form.pt")
torch.save(model.state_dict(), path)
model.load_state_dict(torch.load(path))
# the builders (FreeFormFlow.mlp, .images) record themselves: model.save / FreeFormFlow.load
