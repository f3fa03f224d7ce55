"""Job states for Hydra's submitit launcher on a SLURM cluster without accounting.

submitit learns that a job ended from its result file, or else from ``sacct``. A job that dies without a result
file (killed, a node lost, a process that exits without raising: a SystemExit) on a cluster with no accounting
storage -- the README's local cluster, many small ones -- then leaves the sweep polling ``sacct`` forever, one
"Bypassing sacct error" warning per poll. ``install()`` makes submitit ask ``squeue`` when ``sacct`` fails: a job
squeue lists has its state; a registered job squeue no longer lists has ended (its result file, or its absence,
then decides success or failure, as submitit does). One line says so, instead of a warning per poll.
"""
from __future__ import annotations

import subprocess
import sys
import time

ENDED = "ENDED (not in squeue; no SLURM accounting)"


def squeue_states(job_ids: set[str], run=subprocess.run) -> dict[str, dict[str, str]]:
    """``{job_id: {"State": ...}}`` for each of ``job_ids`` (plain ids or array tasks ``12_3``) from squeue; one
    that squeue does not list has ended. Raises OSError/CalledProcessError when squeue itself fails."""
    out = run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60, check=True).stdout
    listed = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {j: {"State": listed.get(j, ENDED).strip(), "JobID": j} for j in job_ids}


def install() -> None:
    """Patch submitit's SLURM watcher (idempotent): on a failed ``sacct`` call, job states come from ``squeue``."""
    try:
        from submitit.slurm import slurm
    except ImportError:
        return
    watcher = slurm.SlurmInfoWatcher
    if getattr(watcher, "_jambatrain_squeue", False):
        return
    announced = []

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        try:
            self._output = subprocess.check_output(command, shell=False, stderr=subprocess.PIPE)
            self._info_dict.update(self.read_info(self._output))
        except (OSError, subprocess.CalledProcessError) as e:
            why = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip() or str(e)
            try:
                self._info_dict.update(squeue_states(self._registered - self._finished))
            except (OSError, subprocess.SubprocessError) as e2:
                print(f"jambatrain: sacct ({why}) and squeue ({e2}) both failed; job states unknown",
                      file=sys.stderr, flush=True)
            else:
                if not announced:
                    announced.append(1)
                    print(f"jambatrain: sacct failed ({why.splitlines()[0][:200]}): taking job states from squeue",
                          file=sys.stderr, flush=True)
        self._last_status_check = time.time()

    watcher.update = update
    watcher._jambatrain_squeue = True
