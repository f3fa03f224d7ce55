#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs jambatrain into it, editable, with the given extras.
# CPU boxes get the CPU torch pinned by launch/constraints-cpu.txt; GPU boxes keep their own torch.
# Usage: bash launch/setup_env.sh [extras]   e.g. bash launch/setup_env.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export PIP_CONSTRAINT="$PWD/launch/constraints-cpu.txt"
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
