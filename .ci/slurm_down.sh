#!/usr/bin/env bash
# Stop the daemons .ci/slurm_up.sh started (cancelling any jobs left), by the pids in their pid files.
BASE=${SLURM_CI_DIR:-/tmp/slurm-ci}
scancel --user=root 2>/dev/null || true
for f in "$BASE"/run/slurmd-*.pid "$BASE"/run/slurmctld.pid /run/munge/munged.pid; do
  [ -s "$f" ] || continue
  pid=$(cat "$f"); kill "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
done
