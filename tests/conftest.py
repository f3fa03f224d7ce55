import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One embedded-corpus build per test session, shared by the end-to-end tests."""
    return str(tmp_path_factory.mktemp("jambatrain_cache"))


@pytest.fixture
def train_env(cache_dir, tmp_path):
    env = dict(os.environ)
    env.update(JAMBATRAIN_CACHE=cache_dir, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               WANDB_DIR=str(tmp_path), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb_data"), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
               PYTHONPATH=REPO, HYDRA_FULL_ERROR="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JAMBATRAIN_RUN_DIR"):
        env.pop(k, None)
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it. torchrun starts its workers in sessions of their own, so a
    process-group kill would leave them running (holding a cache lock, a port); the tree is collected first."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def run_proc(cmd, *, timeout: float, tail: int = 6000, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)`` for commands that start
    processes of their own (torchrun, a trainer): on timeout every process of the tree is killed and the test fails
    with the end of what the command printed, instead of an empty timeout with orphans left behind."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate()
        timed_out = True
    except BaseException:  # Ctrl-C, a pytest-timeout: leave nothing behind
        kill_tree(p.pid)
        raise
    else:
        timed_out = False
    if timed_out:
        pytest.fail(f"timed out after {timeout} s (process tree killed): {' '.join(map(str, cmd))[:500]}\n"
                    f"--- stdout (end) ---\n{out[-tail:]}\n--- stderr (end) ---\n{err[-tail:]}", pytrace=False)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_worker(worker: str, nproc: int, *args, timeout: float = 600, **env) -> dict:
    """Run ``worker`` (a tests/*_worker.py) under ``torch.distributed.run`` with ``nproc`` gloo ranks on a free port,
    the launcher's own env only (no inherited RANK / MASTER_PORT ...), and return the JSON of its last ``RESULT``
    line; the test fails with the end of its output if it exits non-zero or prints none."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), worker, *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **{k: str(v) for k, v in env.items()}}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    p = run_proc(cmd, cwd=REPO, env=full_env, timeout=timeout)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def record_moe_backends(monkeypatch) -> list[str]:
    """The MoE backends the layers run from now on, by name, one entry per expert computation: observed through
    ``moe_backends.BACKENDS``, the table every MoE forward takes its backend from."""
    import dataclasses

    from jambatrain.models import moe_backends

    ran: list[str] = []
    for name, backend in list(moe_backends.BACKENDS.items()):
        def expert_mlp(*args, _backend=backend, **kwargs):
            ran.append(_backend.name)
            return _backend.expert_mlp(*args, **kwargs)

        monkeypatch.setitem(moe_backends.BACKENDS, name, dataclasses.replace(backend, expert_mlp=expert_mlp))
    return ran


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter, norm weights (model, dt/B/C) and router included, so parity and
    causality tests exercise every weight non-trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_(r * 0.5)
            elif "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1 + 0.4 * r)
            elif name.endswith("router.weight"):
                p.copy_(r * 2 / p.shape[-1] ** 0.5)  # sharp routing: top-k choices far from ties
            elif p.dim() >= 2 and "embed" not in name:
                p.copy_(r * 0.8 / p.shape[-1] ** 0.5)  # ~unit-variance activations
            else:
                p.copy_(r * 0.5)
    return model
