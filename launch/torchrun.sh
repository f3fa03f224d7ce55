#!/usr/bin/env bash
# Single node, N processes (GPUs, or CPU processes over gloo): bash launch/torchrun.sh N [hydra overrides...]
#   bash launch/torchrun.sh 8 experiment=h200_1b
#   bash launch/torchrun.sh 2 experiment=tiny_cpu trainer.max_steps=30
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC [overrides...]}
shift
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# NVLink multicast (NVLS) stays off unless you know your fabric supports it
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# jambatrain.torchrun = torchrun that passes SIGTERM / SIGUSR1 / SIGINT on to the trainers (they checkpoint at the
# next step and exit 0) and waits for them; exec: a signal to this script's pid reaches it
exec "$py" -m jambatrain.torchrun --standalone --nproc_per_node "$nproc" -m jambatrain.train "$@"
