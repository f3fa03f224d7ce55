"""One job per run dir: ``RUN_DIR/.jambatrain.lock``, taken by global rank 0 before anything in the run dir is written.

Works on shared filesystems (NFS, Lustre, GPFS): the lock is created with ``O_CREAT | O_EXCL`` (atomic there too)
and holds its holder: host, pid (and the pid's start time, so a reused pid is not taken for the holder), SLURM job
id, a random token. The holder's rank 0 touches the file every ``HEARTBEAT_S`` seconds from a thread. A second job
is refused with the holder named, unless the lock is stale:
  - the holder's job id is this job's (a SLURM requeue of the same job: its earlier attempt is gone),
  - the holder ran on this host and its process is gone,
  - the holder ran on another host and its heartbeat is older than ``trainer.lock_stale_minutes``.
A stale lock is taken over under a takeover guard (an ``mkdir``, atomic everywhere) that re-reads the lock and
renames it aside only if it is still the stale one, then creates a fresh one with ``O_EXCL``: of two jobs taking over
at once, one wins and the other is refused. If the holder finds its lock taken over (it was suspended past the stale
age), ``lost`` is set and the trainer stops instead of writing another checkpoint.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

LOCK_NAME = ".jambatrain.lock"
HYDRA_COPY = ".jambatrain.hydra"  # the lock holder's copy of RUN/.hydra/
HEARTBEAT_S = 30.0


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _pid_start(pid)
    return start is None or now is None or now == start


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{job}, started {holder.get('started')}"


class RunLock:
    def __init__(self, run_dir: str, stale_s: float, heartbeat_s: float = HEARTBEAT_S):
        self.run_dir, self.stale_s, self.heartbeat_s = run_dir, stale_s, heartbeat_s
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                   "job": os.environ.get("SLURM_JOB_ID"), "token": uuid.uuid4().hex,
                   "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        self.lost: str | None = None  # set by the heartbeat when another job took the lock over
        self.took_over: str | None = None  # why a stale lock was taken over (said by the trainer)
        self._stop = threading.Event()
        self._thread = None

    # ------------------------------------------------------------ taking it
    def _read(self) -> tuple[dict | None, float | None]:
        age = 0.0
        try:
            age = time.time() - os.stat(self.path).st_mtime
            with open(self.path) as f:
                return json.load(f), age
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return {}, age  # being written, or torn: judged by its age alone

    def stale_reason(self, holder: dict, age: float) -> str | None:
        """Why ``holder``'s lock (heartbeat ``age`` seconds ago) may be taken over (None: it is live)."""
        if holder.get("job") and holder.get("job") == self.me["job"]:
            return f"it is held by this SLURM job {holder['job']} (an earlier attempt: requeued)"
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            if not _alive(holder["pid"], holder.get("pid_start")):
                return f"its process {holder['pid']} on this host is gone"
            return None
        if age > self.stale_s:
            return f"its heartbeat is {age / 60:.1f} min old (trainer.lock_stale_minutes={self.stale_s / 60:g})"
        return None

    def acquire(self) -> None:
        """Take the lock or raise SystemExit naming the holder."""
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.me, f)
                    f.flush()
                    os.fsync(f.fileno())
                self._start_heartbeat()
                return
            holder, age = self._read()
            if holder is None:
                continue  # released meanwhile
            if not holder and age < 5:
                time.sleep(0.2)  # being written by its holder
                continue
            why = self.stale_reason(holder, age) if holder else f"it is unreadable and {age:.0f} s old"
            if why is None:
                raise SystemExit(
                    f"jambatrain: the run dir {self.run_dir} is in use by another job ({describe(holder)}; heartbeat "
                    f"{age:.0f} s ago). Two jobs in one run dir would overwrite each other's checkpoints and "
                    "metrics: use another hydra.run.dir, or stop that job first. If it is dead on another host, its "
                    f"lock is taken over once its heartbeat is older than trainer.lock_stale_minutes; or remove "
                    f"{self.path}")
            self._take_over(holder, why)
        raise SystemExit(f"jambatrain: could not take the run-dir lock {self.path} (contended): try again")

    def _take_over(self, holder: dict, why: str) -> None:
        guard = self.path + ".takeover"
        try:
            os.mkdir(guard)
        except FileExistsError:
            try:
                if time.time() - os.stat(guard).st_mtime > 60:  # a takeover that died half way
                    os.rmdir(guard)
            except OSError:
                pass
            time.sleep(0.2)
            return
        try:
            again, _ = self._read()
            if again is not None and again.get("token") == holder.get("token"):
                os.replace(self.path, self.path + ".stale")
                self.took_over = f"took over the run-dir lock of {describe(holder)}: {why}"
        finally:
            os.rmdir(guard)

    # ------------------------------------------------------------ Hydra's copy of the config
    # Hydra writes RUN/.hydra/ (config.yaml, overrides.yaml: what eval composes from) before any task code runs, so
    # before the lock can refuse a second job: the holder keeps a copy, a refused job puts it back.
    def keep_hydra(self, subdir: str | None) -> None:
        import shutil

        src = os.path.join(self.run_dir, subdir) if subdir else None
        if src and os.path.isdir(src):
            shutil.copytree(src, os.path.join(self.run_dir, HYDRA_COPY), dirs_exist_ok=True)

    def restore_hydra(self, subdir: str | None) -> None:
        import shutil

        kept = os.path.join(self.run_dir, HYDRA_COPY)
        if subdir and os.path.isdir(kept):
            shutil.copytree(kept, os.path.join(self.run_dir, subdir), dirs_exist_ok=True)

    # ------------------------------------------------------------ holding it
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="jambatrain-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder, _ = self._read()
            if holder is not None and holder and holder.get("token") != self.me["token"]:
                self.lost = describe(holder)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a read-only or vanished dir: the checkpoint path reports it

    def release(self) -> None:
        self._stop.set()
        holder, _ = self._read()
        if holder and holder.get("token") == self.me["token"]:
            try:
                os.remove(self.path)
            except OSError:
                pass
