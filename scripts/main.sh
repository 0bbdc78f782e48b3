#!/usr/bin/env bash
# Set up .venv if needed (scripts/bootstrap.sh) and run the main job: train RNF-ML (exact volume
# term) on the paper's von Mises circle, then evaluate it and draw its plots. About 2-3 minutes
# on a 2-core CPU after the one-time build. Extra arguments go to `injflow train`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec .venv/bin/injflow train --data von-mises --latent-dim 1 --method exact --epochs 50 \
  --ambient-layers 6 --ambient-hidden 64,64 --prior-layers 3 --likelihood-warmup 5 20 \
  --out runs/von-mises-exact --overwrite "$@"
