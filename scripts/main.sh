#!/usr/bin/env bash
# Set up .venv if needed (scripts/bootstrap.sh) and run the main job: the gram_logdet benchmark
# against the plain-PyTorch way (table on stdout, JSON in bench/results/).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec .venv/bin/python bench/gram_logdet.py --quick "$@"
