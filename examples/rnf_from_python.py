"""(c) A rectangular flow (RNF) from Python, without the command line: build, train, then
log_prob and sample.

RectangularFlow.tabular(D, d) builds the default model (an ambient flow h of affine couplings,
a prior flow f on the latent); TrainStep(model, method) runs one training step of a registered
method ("exact", "hutchinson", "surrogate", "two-step"). The data come from the library's
synthetic sets here; any (N, D) tensor works.

    python examples/rnf_from_python.py [--method exact] [--steps 2000]
"""

import argparse
import os
import tempfile

import torch

from injflow_ext import RectangularFlow, TrainStep, make_objective
from injflow_ext.data import load_dataset

p = argparse.ArgumentParser()
p.add_argument("--method", default="exact", choices=["exact", "hutchinson", "surrogate"])
p.add_argument("--steps", type=int, default=2000)
args = p.parse_args()
torch.manual_seed(0)

data = load_dataset("von-mises", n_samples=3000, seed=0)    # a density on a circle in R^2
train = torch.tensor(data.train, dtype=torch.float32)
test = torch.tensor(data.test, dtype=torch.float32)

model = RectangularFlow.tabular(2, 1, data_shift=train.mean(0).tolist(),
                                data_scale=train.std(0).tolist())
model.initialize(train[:500])                              # ActNorm's data-dependent start
step = TrainStep(model, make_objective(args.method, beta=50.0), lr=1e-3)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(step.optimizers["all"], args.steps)

for i in range(args.steps):
    out = step(train[torch.randint(0, len(train), (500,))])
    schedule.step()
    if i % 500 == 0 or i == args.steps - 1:
        print(f"step {i:5d}  loss {float(out['loss']):8.3f}")

model.eval()
with torch.no_grad():
    log_p = model.log_prob(test)          # exact, on the manifold, at the test points' projections
    x = model.sample(1000, torch.Generator().manual_seed(1))
print(f"test log-likelihood: mean {log_p.mean().item():.3f}, median {log_p.median().item():.3f}")
print(f"samples: mean radius {x.norm(dim=1).mean().item():.3f} (the data's circle: "
      f"{test.norm(dim=1).mean().item():.3f})")
path = os.path.join(tempfile.mkdtemp(), "rnf.pt")
model.save(path)                          # a builder's model: one file with its config
print(f"saved; RectangularFlow.load gives log-likelihood "
      f"{RectangularFlow.load(path).log_prob(test).mean().item():.3f}")
