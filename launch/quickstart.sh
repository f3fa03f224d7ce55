#!/usr/bin/env bash
# Quickstart: install, then pretrain the tiny Jamba on the embedded corpus (Python's stdlib sources) on CPU.
# Extra arguments are Hydra overrides, e.g. `bash launch/quickstart.sh trainer.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_SILENT=true
exec .venv/bin/python -m jambatrain.train experiment=tiny_cpu "hydra.run.dir=runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
