#!/usr/bin/env bash
# Set up .venv if needed (scripts/bootstrap.sh) and run the main job: train RNF-ML (exact volume
# term) with the default options on the paper's von Mises circle for 4,000 steps of 500 points,
# then evaluate it (KL on the circle's angle, test log-likelihood, ...) and draw its plots.
# About 2 minutes on a 2-core CPU after the one-time build. Extra arguments go to `injflow train`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec .venv/bin/injflow train --data von-mises --method exact --steps 4000 --batch-size 500 \
  --out runs/von-mises-exact --overwrite "$@"
