#!/usr/bin/env bash
# Installs jambatrain with its test extras into ./.venv and runs the test suite (CPU; `-m gpu` on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh dev
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q "$@"
