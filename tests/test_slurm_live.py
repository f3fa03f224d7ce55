"""launch/slurm.sbatch and the submitit launcher on a live SLURM cluster: the one .ci/slurm_up.sh brings up on this
host (real slurmctld + two slurmd, ClusterName=jambatrain-ci, nodes n1 n2 of one CPU each).

Skipped when that cluster is not up; JAMBATRAIN_REQUIRE_SLURM=1 (set by .ci/run) turns its absence into a failure.

One 2-node job is preempted three ways in a row: `scontrol requeue` (SIGTERM), `scancel --signal=USR1`, and its time
limit (the job's limit is cut so that slurmctld sends the `--signal=B:USR1@120` warning). Each must end in a checkpoint
at the next step boundary and the job back in the queue; every attempt resumes where the last one checkpointed, and the
losses of all steps equal those of an uninterrupted 2-node run bit for bit. The job's id is given a stale run dir first
(as after a cluster's state is reset), which must not be resumed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SBATCH = os.path.join(REPO, "launch", "slurm.sbatch")
COMMON = ["experiment=tiny_cpu", "trainer.log_every=1", "trainer.progress_bar=false", "logger=none",
          "optim.warmup_steps=2", "optim.decay_steps=1000",  # the LR at a step does not depend on max_steps
          "trainer.save_every=1000"]  # checkpoints come from the stop signals (and the end of the reference run)
WAIT_S = 600


def _cluster_problem() -> str | None:
    try:
        p = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no SLURM client ({e}); bring the CI cluster up with `bash .ci/slurm_up.sh` (root, Debian)"
    if p.returncode != 0:
        return f"slurmctld not reachable: {p.stderr.strip()[-300:]}"
    if not re.search(r"^ClusterName\s*=\s*jambatrain-ci\s*$", p.stdout, re.M):
        return "the SLURM cluster here is not the CI one of .ci/slurm_up.sh (ClusterName=jambatrain-ci)"
    for _ in range(60):  # nodes still completing an earlier job come back within seconds
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30).stdout
        up = {n for n, t in (line.split() for line in nodes.splitlines()) if t.rstrip("*~#") in ("idle", "mix")}
        if {"n1", "n2"} <= up:
            return None
        time.sleep(1)
    return "nodes n1, n2 not both idle: " + nodes.strip().replace("\n", ", ")


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        if os.environ.get("JAMBATRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"JAMBATRAIN_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def slurm_env(cluster, tmp_path_factory, cache_dir):
    """The environment jobs inherit (sbatch exports the submitter's): the session's corpus cache and a runs/ of
    their own under /tmp, so nothing is written into the checkout."""
    root = tmp_path_factory.mktemp("slurm_live")
    env = dict(os.environ, JAMBATRAIN_CACHE=cache_dir, JAMBATRAIN_RUNS_ROOT=str(root / "runs"), OMP_NUM_THREADS="1",
               WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JAMBATRAIN_RUN_DIR",
              "JAMBATRAIN_SWEEP_DIR", "GPUS_PER_NODE"):
        env.pop(k, None)
    return env, root


def _sh(*cmd, env=None, check=True) -> str:
    p = subprocess.run(list(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p.stdout.strip()


def _submit(env, root, *args) -> tuple[str, str]:
    out = str(root / "slurm-%j.out")
    job = _sh("sbatch", "--parsable", f"--output={out}", *args, env=env).split(";")[0]
    return job, out.replace("%j", job)


def _job(job: str) -> str:
    return _sh("scontrol", "show", "job", job, check=False)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _wait(what: str, cond, out: str, timeout: float = WAIT_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; job output:\n{_read(out)[-4000:]}")


def _losses(run_dir: str) -> dict[int, float]:
    rows = {}
    for line in _read(os.path.join(run_dir, "metrics.jsonl")).splitlines():
        r = json.loads(line)
        if "loss" in r:
            rows[r["step"]] = r["loss"]  # a step logged twice (before a kill, then after the resume): the last
    return rows


def _last_step(run_dir: str) -> int:
    return max(_losses(run_dir), default=0)


def _attempts(text: str) -> list[tuple[int, int]]:
    # a fresh start says "started from step 0", a requeued attempt "resumed at step S"
    found = re.findall(r"^jambatrain: job \d+ attempt (\d+) (resumed at|started from) step (\d+)", text, re.M)
    assert all((how == "started from") == (s == "0") for _, how, s in found), found
    return [(int(a), int(s)) for a, _, s in found]


def _ended(text: str) -> list[tuple[int, int, str]]:
    return [(int(a), int(s), why) for a, s, why in
            re.findall(r"^jambatrain: job \d+ attempt (\d+) ended at step (\d+): (.*)$", text, re.M)]


def _gone(job: str) -> bool:
    return not _sh("squeue", "-h", "-j", job, check=False)


@pytest.fixture(scope="module")
def preempted(slurm_env):
    """The preempted job, then the uninterrupted reference run to the step it reached. Returns what the tests check."""
    env, root = slurm_env
    job, out = _submit(env, root, "--hold", "--nodes=2", "--time=30", "--signal=B:USR1@120", SBATCH, *COMMON,
                       "trainer.max_steps=100000")
    try:
        # a stale run dir under this job id, as left by an earlier job when the cluster's state was reset
        stale = os.path.join(env["JAMBATRAIN_RUNS_ROOT"], f"jambatrain-{job}")
        os.makedirs(os.path.join(stale, "checkpoints", "step_00000007"))
        with open(os.path.join(stale, "checkpoints", "latest"), "w") as f:
            f.write("step_00000007\n")
        with open(os.path.join(stale, "checkpoints", "step_00000007", "train_state.json"), "w") as f:
            f.write('{"step": 7}\n')
        _sh("scontrol", "release", job)

        run_dir = _wait("the run dir", lambda: (re.findall(r"run dir (\S+)\)", _read(out)) or [None])[0], out)

        def preempt_after_3_steps(attempt: int, how) -> None:
            _wait(f"attempt {attempt}", lambda: attempt in dict(_attempts(_read(out))), out)
            start = dict(_attempts(_read(out)))[attempt]
            _wait(f"3 steps of attempt {attempt}", lambda: _last_step(run_dir) >= start + 3, out)
            how()

        preempt_after_3_steps(1, lambda: _sh("scontrol", "requeue", job))
        preempt_after_3_steps(2, lambda: _sh("scancel", "--signal=USR1", job))

        def near_the_time_limit():
            # cut the limit so that `--signal=B:USR1@120` is due now and the kill is still >= 60 s away: slurmctld
            # sends the warning at its next time-limit check (every ~30 s), as it would 120 s before a real limit
            m = re.match(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$", _sh("squeue", "-h", "-j", job, "-o", "%M"))
            d, h, mi, s = (int(x or 0) for x in m.groups())
            elapsed = ((d * 24 + h) * 60 + mi) * 60 + s
            _sh("scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed // 60 + 2}")
            _wait("the time-limit signal", lambda: "attempt 3: SIGUSR1" in _read(out), out, timeout=180)
            _sh("scontrol", "update", f"JobId={job}", "TimeLimit=30")  # the next attempt gets the whole limit again

        preempt_after_3_steps(3, near_the_time_limit)
        preempt_after_3_steps(4, lambda: None)
        restarts = re.search(r"Restarts=(\d+)", _job(job)).group(1)
        _sh("scancel", job)
        _wait("the end of the job", lambda: _gone(job), out)
        text = _read(out)
    finally:
        _sh("scancel", job, check=False)

    last = _last_step(run_dir)
    ref, ref_out = _submit(env, root, "--nodes=2", SBATCH, *COMMON, f"trainer.max_steps={last}")
    _wait("the reference run", lambda: _gone(ref), ref_out)
    ref_dir = re.findall(r"run dir (\S+)\)", _read(ref_out))[0]
    yield dict(job=job, text=text, run_dir=run_dir, stale=stale, restarts=int(restarts), last=last, ref=ref,
               ref_text=_read(ref_out), ref_state=_job(ref), ref_dir=ref_dir)
    shutil.rmtree(root / "runs", ignore_errors=True)


def test_two_node_sbatch_run_completes_on_a_cpu_cluster(preempted):
    """`sbatch --nodes=2 launch/slurm.sbatch experiment=tiny_cpu` with no resource options: accepted by a cluster
    without GPUs, one process per node, COMPLETED, every step logged and the last one checkpointed."""
    p = preempted
    assert "JobState=COMPLETED" in p["ref_state"], p["ref_text"][-3000:]
    assert "2 nodes x 1 procs" in p["ref_text"]
    assert sorted(_losses(p["ref_dir"])) == list(range(1, p["last"] + 1))
    assert os.path.isdir(os.path.join(p["ref_dir"], "checkpoints", f"step_{p['last']:08d}"))
    assert _attempts(p["ref_text"]) == [(1, 0)]
    assert _ended(p["ref_text"]) == [(1, p["last"], "trainers exited 0")]


def test_requeue_usr1_and_time_limit_each_checkpoint_and_requeue(preempted):
    """scontrol requeue, scancel --signal=USR1 and the time-limit signal: each attempt checkpoints the step it is on,
    the job comes back (Restarts=3), and the next attempt resumes at exactly that step. All output is kept."""
    p = preempted
    text = p["text"]
    ended, attempts = _ended(text), _attempts(text)
    assert [a for a, _ in attempts] == [1, 2, 3, 4] and attempts[0] == (1, 0), text[-4000:]
    assert [e[0] for e in ended[:3]] == [1, 2, 3], text[-4000:]
    assert ended[0][2].startswith("SIGTERM")  # scontrol requeue: SLURM requeues the job itself
    assert ended[1][2].startswith("SIGUSR1") and ended[1][2].endswith("requeued")  # scancel --signal=USR1
    assert ended[2][2].startswith("SIGUSR1") and ended[2][2].endswith("requeued")  # the time limit
    assert "attempt 3: SIGUSR1" in text and "attempt 2: SIGUSR1" not in text  # only the time limit signals the shell
    for (_, stop_step, why), (_, resumed_at) in zip(ended[:3], attempts[1:]):
        assert stop_step > 0 and resumed_at == stop_step, (why, text[-4000:])
        assert f"stop signal received, checkpointed step {stop_step}" in text
        assert f"resumed from {p['run_dir']}/checkpoints/step_{stop_step:08d} at step {stop_step}" in text
    assert "trainers exited 0" in ended[1][2] and "trainers exited 0" in ended[2][2]
    assert p["restarts"] == 3


def test_every_attempt_continues_with_the_losses_of_an_uninterrupted_run(preempted):
    p = preempted
    got, want = _losses(p["run_dir"]), _losses(p["ref_dir"])
    assert sorted(got) == sorted(want) == list(range(1, p["last"] + 1))
    assert got == want  # bit-exact on CPU


def test_a_reused_job_id_never_resumes_a_stale_run_dir(preempted):
    p = preempted
    assert p["run_dir"] != p["stale"] and os.path.basename(p["run_dir"]).startswith(os.path.basename(p["stale"]) + "-")
    assert "belongs to an earlier job with the same id" in p["text"]
    assert sorted(os.listdir(p["stale"])) == ["checkpoints"]  # untouched
    assert sorted(os.listdir(os.path.join(p["stale"], "checkpoints"))) == ["latest", "step_00000007"]


def test_hydra_multirun_through_submitit_runs_each_sweep_job_on_the_cluster(slurm_env):
    """`-m hydra/launcher=slurm_cpu hydra.launcher.nodes=2`: one SLURM job per sweep point, each a 2-rank world over
    both nodes (submitit starts one task per node; jambatrain exports torch's env from the task layout)."""
    env, root = slurm_env
    sweep = root / "sweep"
    cmd = [sys.executable, "-m", "jambatrain.train", "-m", "hydra/launcher=slurm_cpu", "hydra.launcher.nodes=2",
           "hydra.launcher.timeout_min=10", "experiment=tiny_cpu", "optim.lr=1e-3,2e-3", "trainer.max_steps=2",
           "logger=none", "trainer.progress_bar=false", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    jobs = sorted(j for j in os.listdir(sweep / ".submitit") if re.fullmatch(r"\d+_\d+", j))  # an array job's tasks
    assert len(jobs) == 2, os.listdir(sweep / ".submitit")
    for job in jobs:  # real SLURM jobs, run on both nodes (the results come back while a job is still ending)
        _wait(f"the end of sweep job {job}", lambda: "JobState=RUNNING" not in _job(job) and "COMPLETING" not in
              _job(job), str(sweep / ".submitit" / job / f"{job}_0_log.err"), timeout=120)
        info = _job(job)
        assert "JobState=COMPLETED" in info and "NodeList=n[1-2]" in info, info
    for n, lr in (("0", 1e-3), ("1", 2e-3)):
        ckpt = sweep / n / "checkpoints" / "step_00000002"
        assert sorted(f for f in os.listdir(ckpt) if f.startswith("rng_rank")) == ["rng_rank0.pt", "rng_rank1.pt"]
        rows = [json.loads(line) for line in _read(str(sweep / n / "metrics.jsonl")).splitlines()]
        assert rows[-1]["step"] == 2 and rows[-1]["tokens"] == 2 * 2 * 4 * 256  # 2 ranks x micro batch 4
        assert f"lr: {lr}" in _read(str(sweep / n / "config.yaml"))
