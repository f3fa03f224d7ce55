import os
import socket

import pytest

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
