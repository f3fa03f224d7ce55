import os
import socket

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
