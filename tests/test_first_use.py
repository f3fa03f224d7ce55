"""The first-use path: the embedded-corpus build inside a distributed run (never forks once threads exist), its
lock (a dead or stuck holder is reported, never waited on forever), and the test helper that kills a timed-out
command's whole process tree."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, free_port, kill_tree, run_proc

WORKER = os.path.join(REPO, "tests", "first_use_worker.py")


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# A parent with a thread that holds a lock for good, and a tokenizer loader wrapped to take that lock: a pool worker
# forked from it inherits the held lock with no thread to release it (what gloo / OpenMP / allocator locks do at a
# fork, when another thread happens to hold one: intermittent in a real run, certain here).
TRAP = """
import multiprocessing as mp, sys, threading, types
import sentencepiece as spm
from jambatrain.data import shards, tokenizer
files = [f for f in {files!r}]
tokenizer.train_tokenizer(files, {prefix!r}, 500, num_threads=1)
held = threading.Lock()
def holder():
    with held:
        threading.Event().wait()
threading.Thread(target=holder, daemon=True).start()
while not held.locked():
    pass
real = shards.load_tokenizer
def trapped(path):  # only pool workers call it
    with held:
        return real(path)
shards.load_tokenizer = trapped
if {force_fork!r}:  # the code before the fix: mp.Pool in the default (fork) context
    fork = mp.get_context("fork")
    shards.mp = types.SimpleNamespace(get_context=lambda method=None: fork, Pool=fork.Pool)
docs = [(i, open(f).read()) for i, f in enumerate(files)]
sp = real({prefix!r} + ".model")
got = list(shards.tokenize_documents(iter(docs), {prefix!r} + ".model", 2))
assert [i for i, _ in got] == list(range(len(docs)))
assert all(list(t[:-1]) == sp.encode(docs[i][1]) and t[-1] == sp.eos_id() for i, t in got)
print("TOKENIZED", len(got), flush=True)
"""


def _trap_cmd(tmp_path, force_fork: bool):
    from jambatrain.data.corpus import stdlib_documents

    code = TRAP.format(files=stdlib_documents(6), prefix=str(tmp_path / f"tok{int(force_fork)}"),
                       force_fork=force_fork)
    return [sys.executable, "-c", code]


def test_tokenizer_pool_never_forks_from_a_threaded_parent(tmp_path):
    """The pool of ``tokenize_documents`` spawns its workers: with a lock held by another thread of the parent, the
    documents are tokenized (same ids as in-process) where the old fork path hangs (shown below under a timeout)."""
    p = run_proc(_trap_cmd(tmp_path, force_fork=False), cwd=REPO, env=_env(), timeout=120)
    assert p.returncode == 0 and "TOKENIZED 6" in p.stdout, p.stdout + p.stderr[-3000:]

    # the old path: the same parent with mp.Pool forking; it never finishes (killed, whole tree, after 15 s)
    proc = subprocess.Popen(_trap_cmd(tmp_path, force_fork=True), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=15)
        pytest.fail(f"the fork path finished (rc {proc.returncode}); it was expected to hang:\n{out}\n{err[-2000:]}")
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
    assert "TOKENIZED" not in out


@pytest.mark.slow
def test_corpus_build_inside_a_two_rank_run_repeated(tmp_path):
    """torchrun, 2 gloo ranks: the trainer's ``prepare_data`` builds the embedded corpus on rank 0 three times (fresh
    cache dirs) with the process group up and a lock held by another thread; no ``os.fork`` happens, every build
    finishes and both ranks read the same manifest. Before the fix the first build hung (the test's timeout then
    kills the whole tree and shows the output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           WORKER, str(tmp_path), "3"]
    p = run_proc(cmd, cwd=REPO, env=_env(), timeout=300)
    results = [json.loads(line[len("RESULT "):]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and len(results) == 2, p.stdout[-3000:] + p.stderr[-5000:]
    assert [r["forks"] for r in results] == [0, 0]
    assert results[0]["samples"] == results[1]["samples"] and len(set(results[0]["samples"])) == 1
    assert results[0]["samples"][0] > 0
    assert p.stdout.count("jambatrain: embedded corpus built in") == 3  # the build says what it did, once each


# ------------------------------------------------------------------------------------------------ the build lock

HOLDER = """
import fcntl, json, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(json.dumps({"pid": int(sys.argv[2]), "host": sys.argv[3], "since": time.time()}))
f.flush()
print("LOCKED", flush=True)
time.sleep(600)
"""


def _hold_lock(out_dir, recorded_pid=None):
    """A process that holds ``out_dir/.prepare.lock`` and records ``recorded_pid`` (default its own) as holder."""
    import socket

    os.makedirs(out_dir, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, os.path.join(out_dir, ".prepare.lock"), "0",
                             socket.gethostname()], stdout=subprocess.PIPE, text=True, start_new_session=True)
    if recorded_pid is None:
        recorded_pid = proc.pid
    assert proc.stdout.readline().strip() == "LOCKED"
    with open(os.path.join(out_dir, ".prepare.lock"), "w") as f:  # the holder's record (flock is advisory)
        json.dump({"pid": recorded_pid, "host": socket.gethostname(), "since": time.time()}, f)
    return proc


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_held_by_an_orphan_of_a_dead_builder_is_replaced(tmp_path, capfd):
    """The recorded builder is dead but a process it left behind (a forked worker inheriting the descriptor) still
    holds the flock: the next builder replaces the lock file instead of waiting forever."""
    from jambatrain.data.corpus import build_lock

    out = str(tmp_path / "corpus")
    orphan = _hold_lock(out, recorded_pid=_dead_pid())
    try:
        t0 = time.time()
        with build_lock(out, timeout_s=30):
            took = time.time() - t0
        assert took < 10
        assert "is held but its builder (pid" in capfd.readouterr().err
    finally:
        kill_tree(orphan.pid)
        orphan.wait()


def test_lock_held_by_a_stuck_live_builder_times_out_naming_it(tmp_path, capfd):
    """A live builder that writes nothing for the timeout: the waiter stops with an error naming its pid and host
    (and says once whom it waits for) instead of blocking forever."""
    from jambatrain.data.corpus import build_lock
    from jambatrain.data.shards import ShardDataError

    out = str(tmp_path / "corpus")
    holder = _hold_lock(out)
    try:
        with pytest.raises(ShardDataError, match=rf"pid {holder.pid} on .*looks stuck"):
            with build_lock(out, timeout_s=1.5):
                pass
        assert capfd.readouterr().err.count("waiting for the corpus build") == 1
    finally:
        kill_tree(holder.pid)
        holder.wait()
    with build_lock(out, timeout_s=5):  # the holder gone: free at once
        pass


def test_run_proc_kills_the_whole_tree_and_shows_the_output(tmp_path):
    """A timed-out command: its children in sessions of their own (as torchrun starts its workers) are killed
    too, and the failure shows what it printed."""
    pidfile = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        open({str(pidfile)!r}, "w").write(str(c.pid))
        print("parent says hello", flush=True)
        time.sleep(600)
    """)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)timed out after 3 s.*parent says hello"):
        run_proc([sys.executable, "-c", code], timeout=3)
    child = int(pidfile.read_text())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
