"""Nothing lost (issue 21): checksummed checkpoints, one job per run dir, no poisoned saves, stop signals through every
launcher, a crash in the first save, a stalled rank, file-size limits and read-only dirs. Each test fails on the code
before these changes (e0729c4)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from conftest import REPO, free_port
from jambatrain import checkpoint
from jambatrain.models import ModelConfig

TRAIN = ["experiment=tiny_cpu", "trainer.progress_bar=false", "logger=none"]


def train_cmd(run_dir, *overrides, nproc=1, launcher="python"):
    if launcher == "python":
        cmd = [sys.executable, "-m", "jambatrain.train"]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "jambatrain.train"]
    else:  # launch/torchrun.sh
        cmd = ["bash", os.path.join(REPO, "launch", "torchrun.sh"), str(nproc)]
    return cmd + [*TRAIN, f"hydra.run.dir={run_dir}", *overrides]


def run(env, run_dir, *overrides, nproc=1, launcher=None, timeout=600):
    launcher = launcher or ("torchrun" if nproc > 1 else "python")
    return subprocess.run(train_cmd(run_dir, *overrides, nproc=nproc, launcher=launcher), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tags(run_dir):
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def start_endless(run_dir, env, *overrides, nproc=2, launcher="torchrun"):
    """A run that trains until stopped (max_steps 100000), in a session of its own, its output piped."""
    cmd = train_cmd(run_dir, "trainer.max_steps=100000", *overrides, nproc=nproc, launcher=launcher)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_rows(run_dir, n, proc, limit=300):
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(open(path).readlines()) >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"no {n} metrics rows: {proc.poll()}")


# ---------------------------------------------------------------- 1. content checksums
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_newest_that_verifies_resumes(train_env, tmp_path):
    """8 bytes flipped in the middle of the newest params file (sizes unchanged): 2 ranks verify a share of the files
    each, find it, move it aside (kept) and resume from the one before; pruning then keeps the good ones."""
    rd = str(tmp_path / "run")
    common = ["trainer.save_every=2", "trainer.log_every=1", "trainer.keep_checkpoints=2"]
    p = run(train_env, rd, "trainer.max_steps=4", *common, nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    params = os.path.join(rd, "checkpoints", "step_00000004", "params_r00000_000.pt")
    size = os.path.getsize(params)
    with open(params, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(8)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    p = run(train_env, rd, "trainer.max_steps=6", *common, nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    err = p.stdout + p.stderr
    assert "step_00000004 is corrupt (contents differ from the manifest's xxh3_128 checksum in 1 file(s): " \
           "params_r00000_000.pt)" in err, err[-3000:]
    assert "resumed from" in err and "checkpoints/step_00000002 at step 2" in err
    assert tags(rd) == ["latest", "step_00000004", "step_00000004.corrupt", "step_00000006"]
    with open(os.path.join(rd, "checkpoints", "step_00000004.corrupt", "params_r00000_000.pt"), "rb") as f:
        f.seek(size // 2)
        assert f.read(8) == bytes(b ^ 0xFF for b in chunk)  # kept as found


def _ckpt(run_dir, step, data=b"x" * 1000):
    """A tag as the commit protocol writes it, with its files' xxh3-128 checksums in the manifest."""
    import xxhash

    tag_dir = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    os.makedirs(tag_dir)
    state = checkpoint.TrainState(step=step, model_config=asdict(ModelConfig(name="t", num_hidden_layers=2)))
    contents = {"train_state.json": json.dumps(asdict(state)).encode(), "params_r00000_000.pt": data}
    for rel, b in contents.items():
        with open(os.path.join(tag_dir, rel), "wb") as f:
            f.write(b)
    with open(os.path.join(tag_dir, "manifest.json"), "w") as f:
        json.dump({"format": 2, "kind": "portable", "step": step, "files": {k: len(b) for k, b in contents.items()},
                   "checksum": "xxh3_128",
                   "checksums": {k: xxhash.xxh3_128(b).hexdigest() for k, b in contents.items()},
                   "params": {}}, f)
    return tag_dir


def test_export_and_eval_verify_the_checkpoint_they_read(tmp_path, capsys):
    from jambatrain.export_hf import resolve_checkpoint

    rd = str(tmp_path / "run")
    _ckpt(rd, 2)
    bad = _ckpt(rd, 4)
    with open(os.path.join(bad, "params_r00000_000.pt"), "r+b") as f:
        f.seek(500)
        f.write(b"\0" * 8)
    assert resolve_checkpoint(rd) == (os.path.join(rd, "checkpoints"), "step_00000002")  # the run dir: falls back
    assert "step_00000004 passed over: contents differ" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="contents differ"):  # named: refused (eval calls the same)
        resolve_checkpoint(bad)
    assert os.path.isdir(bad)  # export never moves or deletes


# ---------------------------------------------------------------- 2. one job per run dir
def test_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, monkeypatch):
    from jambatrain.run_lock import LOCK_NAME, RunLock

    rd = str(tmp_path / "run")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = RunLock(rd, stale_s=600)
    first.acquire()
    with pytest.raises(SystemExit, match=r"in use by another job \(host .* pid %d" % os.getpid()):
        RunLock(rd, stale_s=600).acquire()  # same host, live pid
    first.release()
    assert not os.path.exists(os.path.join(rd, LOCK_NAME))

    def holder(**kw):
        with open(os.path.join(rd, LOCK_NAME), "w") as f:
            json.dump({"host": "other-node", "pid": 1, "job": None, "token": "t", "started": "then", **kw}, f)

    holder()  # another host, fresh heartbeat: live
    with pytest.raises(SystemExit, match="host other-node pid 1"):
        RunLock(rd, stale_s=600).acquire()
    old = time.time() - 700
    os.utime(os.path.join(rd, LOCK_NAME), (old, old))  # ... no heartbeat for 11 min: stale
    lock = RunLock(rd, stale_s=600)
    lock.acquire()
    assert "heartbeat is 11.7 min old" in lock.took_over
    lock.release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    holder(host=socket.gethostname(), pid=dead.pid)  # this host, process gone
    lock = RunLock(rd, stale_s=600)
    lock.acquire()
    assert f"its process {dead.pid} on this host is gone" in lock.took_over
    lock.release()
    holder(job="777")  # a SLURM requeue of the same job takes over its earlier attempt's lock
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock = RunLock(rd, stale_s=600)
    lock.acquire()
    assert "this SLURM job 777" in lock.took_over
    lock.release()


def test_a_second_job_in_a_locked_run_dir_is_refused_on_every_rank_and_writes_nothing(train_env, tmp_path):
    LOCK_NAME = ".jambatrain.lock"
    rd = tmp_path / "run"
    rd.mkdir()
    import socket

    (rd / ".jambatrain.hydra").mkdir()  # the holder's copy of its Hydra config (what eval composes from)
    (rd / ".jambatrain.hydra" / "overrides.yaml").write_text("- optim.lr=0.001\n")
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        (rd / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "job": "12",
                                                "token": "t", "started": "2026-01-01 00:00:00 UTC"}))
        p = run(train_env, str(rd), "trainer.max_steps=2", nproc=2, timeout=300)
    finally:
        sleeper.kill()
    assert p.returncode != 0
    assert f"is in use by another job (host {socket.gethostname()} pid {sleeper.pid}, SLURM job 12" in p.stderr
    assert not (rd / "config.yaml").exists() and not (rd / "checkpoints").exists()
    assert (rd / ".hydra" / "overrides.yaml").read_text() == "- optim.lr=0.001\n"  # Hydra's rewrite undone


# ---------------------------------------------------------------- 4. poisoned saves, streaks, roll back
def test_a_divergent_update_is_not_checkpointed_a_streak_fails_the_run_and_resume_from_rolls_back(train_env,
                                                                                                  tmp_path):
    rd = str(tmp_path / "run")
    base = ["trainer.log_every=1", "optim.warmup_steps=1"]
    p = run(train_env, rd, "trainer.max_steps=4", "trainer.save_every=2", *base)
    assert p.returncode == 0, p.stderr[-3000:]
    # optim.lr=1e6 from step 4: step 5's update blows the weights up with a finite loss; the save refuses it
    p = run(train_env, rd, "trainer.max_steps=8", "trainer.save_every=1", "optim.lr=1e6", *base)
    assert p.returncode != 0
    assert "step_00000005 was not published" in p.stderr and "a divergent update" in p.stderr, p.stderr[-3000:]
    assert "the last complete one, step_00000004, is kept" in p.stderr
    assert tags(rd) == ["latest", "step_00000002", "step_00000004"]
    # with no save due, the run goes on into a streak of skipped steps: it ends non-zero, saying so
    p = run(train_env, rd, "trainer.max_steps=8", "trainer.save_every=100", "optim.lr=1e6",
            "trainer.skip_spike_warmup=1", *base)
    assert p.returncode != 0, p.stdout[-2000:]
    assert "inside a streak of" in p.stderr and "the last checkpoint is step_00000004" in p.stderr, p.stderr[-2000:]
    assert "step 8 loss" not in p.stdout
    # an operator rolls back to step 2: the newer checkpoint is moved aside, not deleted
    p = run(train_env, rd, "trainer.max_steps=3", "trainer.save_every=1", "trainer.resume_from=2", *base)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rolling back to step_00000002: moved" in p.stdout and "at step 2" in p.stdout
    names = tags(rd)
    assert "step_00000003" in names and "step_00000004" not in names
    assert any(n.startswith("step_00000004.rolled-back-") for n in names), names
    # a restart with the same command line (a requeue) does not roll back again
    p = run(train_env, rd, "trainer.max_steps=4", "trainer.save_every=1", "trainer.resume_from=2", *base)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "trainer.resume_from=2 was applied at" in p.stdout and "checkpoints/step_00000003 at step 3" in p.stdout


# ---------------------------------------------------------------- 5. stop signals through every launcher
def _signal_after_rows(env, rd, sig, launcher, nproc, n=3):
    proc = start_endless(rd, env, "trainer.save_every=100000", "trainer.log_every=1", nproc=nproc,
                         launcher=launcher)
    wait_rows(rd, n, proc)
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    return proc, out, err


def _checkpointed_last_step(rd):
    tag = open(os.path.join(rd, "checkpoints", "latest")).read().strip()
    return tag == f"step_{rows(rd)[-1]['step']:08d}"


def test_sigterm_to_launch_torchrun_sh_checkpoints_and_exits_0_without_a_traceback(train_env, tmp_path):
    rd = str(tmp_path / "run")
    proc, out, err = _signal_after_rows(train_env, rd, signal.SIGTERM, "script", 2)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err
    assert "stop signal received, checkpointed step" in out and _checkpointed_last_step(rd)


def test_sigusr1_to_plain_torchrun_leaves_no_orphans_the_trainers_checkpoint(train_env, tmp_path):
    """torchrun dies of SIGUSR1 (it does not handle it); the kernel's parent-death signal makes the trainers stop at
    the next step with a checkpoint instead of training on unsupervised."""
    import psutil

    rd = str(tmp_path / "run")
    proc = start_endless(rd, train_env, "trainer.save_every=100000", "trainer.log_every=1")
    trainers = []
    try:
        wait_rows(rd, 3, proc)
        trainers = psutil.Process(proc.pid).children()
        assert len(trainers) == 2
        proc.send_signal(signal.SIGUSR1)
        proc.communicate(timeout=240)  # EOF once the trainers, which share its pipes, are gone too
        assert proc.returncode == -signal.SIGUSR1
        gone, alive = psutil.wait_procs(trainers, timeout=180)
        assert not alive, "trainers orphaned"
        assert _checkpointed_last_step(rd)
    finally:  # torchrun's trainers have sessions of their own: a killpg of the launcher's does not reach them
        for t in trainers:
            t.kill() if t.is_running() else None
        os.killpg(proc.pid, signal.SIGKILL) if psutil.pid_exists(proc.pid) else None


def test_ctrl_c_checkpoints_at_the_next_step_with_one_line(train_env, tmp_path):
    rd = str(tmp_path / "run")
    proc, out, err = _signal_after_rows(train_env, rd, signal.SIGINT, "python", 1)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "jambatrain: SIGINT received: checkpointing at the end of this step" in err
    assert _checkpointed_last_step(rd)


# ---------------------------------------------------------------- 6. a crash during the very first save
def test_a_crash_in_the_first_save_starts_afresh_with_the_partial_dir_kept_aside(train_env, tmp_path):
    rd = tmp_path / "run"
    partial = rd / "checkpoints" / "step_00000002.partial"
    partial.mkdir(parents=True)
    (partial / "rng_rank0.pt").write_bytes(b"half")
    p = run(train_env, str(rd), "trainer.max_steps=2", "trainer.save_every=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{partial} is a save that never completed" in p.stdout and "starting afresh from step 0" in p.stdout
    names = tags(str(rd))
    aside = [n for n in names if n.startswith("step_00000002.partial.aborted-")]
    assert aside and (rd / "checkpoints" / aside[0] / "rng_rank0.pt").read_bytes() == b"half"
    assert "step_00000002" in names


# ---------------------------------------------------------------- 7. a stalled rank
def test_a_stalled_rank_ends_the_job_within_the_timeout_naming_it_and_the_job_resumes(train_env, tmp_path):
    import psutil

    rd = str(tmp_path / "run")
    common = ["trainer.save_every=2", "trainer.log_every=1", "parallel.timeout_minutes=0.25"]
    proc = start_endless(rd, train_env, *common)
    trainers = []
    try:
        wait_rows(rd, 3, proc)
        trainers = psutil.Process(proc.pid).children()
        rank1 = next(c for c in trainers if c.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGSTOP)
        t0 = time.time()
        out, err = proc.communicate(timeout=200)
        waited = time.time() - t0
    finally:  # torchrun's trainers have sessions of their own: a killpg of the launcher's does not reach them
        for t in trainers:
            t.kill() if t.is_running() else None
        os.killpg(proc.pid, signal.SIGKILL) if psutil.pid_exists(proc.pid) else None
    assert proc.returncode != 0
    assert "jambatrain: rank 0: a collective in " in err and "parallel.timeout_minutes=0.25" in err, err[-3000:]
    assert "Stalled: rank 1" in err, err[-3000:]
    assert waited < 120, waited
    last = sorted(t for t in tags(rd) if t.startswith("step_") and "." not in t)[-1]
    p = run(train_env, rd, f"trainer.max_steps={int(last[5:]) + 1}", *common, nproc=2)
    assert p.returncode == 0 and f"checkpoints/{last} at step" in p.stdout, p.stderr[-3000:]


# ---------------------------------------------------------------- 8. file-size limit, read-only dir, leftovers
def test_a_file_size_limit_is_not_reported_as_a_full_disk(tmp_path):
    import resource

    import torch

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(Exception) as info:  # torch.save: "unexpected pos", no errno (Python ignores SIGXFSZ)
            checkpoint._fsync_write(str(tmp_path / "p.pt"), lambda f: torch.save(torch.zeros(1 << 20), f))
        msg = checkpoint._write_error(str(tmp_path / "p.pt"), info.value)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "ulimit -f" in msg and "space" not in msg.replace("the disk has room", ""), msg


def test_a_read_only_checkpoint_dir_gives_the_designed_message(tmp_path, monkeypatch):
    rd = str(tmp_path / "run")
    _ckpt(rd, 2)

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(checkpoint.os, "makedirs", read_only)
    state = checkpoint.TrainState(step=4)
    with pytest.raises(SystemExit) as info:
        checkpoint.save(None, None, rd, state, rank=0, keep=3)
    msg = str(info.value)
    assert "step_00000004 was not published" in msg and "step_00000002, is kept" in msg
    assert "no longer writable" in msg and "Read-only file system" in msg


def test_prune_removes_dead_saves_leftovers_but_keeps_what_was_set_aside(tmp_path):
    rd = str(tmp_path / "run")
    root = os.path.join(rd, "checkpoints")
    for step in (2, 4, 6):
        _ckpt(rd, step)
    for name in ("step_00000003.partial", "step_00000004.incomplete-123", "step_00000005.corrupt",
                 "step_00000001.partial.aborted-20260101T000000Z", "step_00000009.partial"):
        os.makedirs(os.path.join(root, name))
    checkpoint.prune(root, keep=2, current="step_00000006")
    assert sorted(os.listdir(root)) == ["step_00000001.partial.aborted-20260101T000000Z", "step_00000004",
                                        "step_00000005.corrupt", "step_00000006", "step_00000009.partial"]
