"""Process-group set-up for torchrun / srun launches: NCCL on GPU, gloo on CPU, one process per device."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from . import ds_compat


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(par: ParallelConfig, local_rank: int) -> torch.device:
    want = par.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but no CUDA device is visible: set parallel.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def export_submitit_env() -> None:
    """Under Hydra's submitit launcher (``hydra/launcher=slurm_gpu``, ``submitit_local``) every task of a job calls
    the training function itself, with no torchrun: export torch's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) from the job's task layout, as torchrun would have. A no-op under torchrun or plain python."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(par: ParallelConfig) -> DistInfo:
    """Read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or submitit's task layout; a plain
    `python -m` run is a world of one on 127.0.0.1. DeepSpeed's communication layer is initialised on top of the
    same group."""
    export_submitit_env()
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # srun started this as one of several tasks with no torchrun in between: each would train alone as rank 0
        # of a world of one, all in the same run dir
        raise SystemExit(f"jambatrain: started as one of {os.environ['SLURM_NTASKS']} SLURM tasks without torchrun: "
                         "launch with launch/slurm.sbatch (srun starts one torchrun per node), or sweep with "
                         "hydra/launcher=slurm_gpu")
    rank = int(os.environ.setdefault("RANK", "0"))
    world = int(os.environ.setdefault("WORLD_SIZE", "1"))
    local_rank = int(os.environ.setdefault("LOCAL_RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    device = _pick_device(par, local_rank)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    backend = par.backend if par.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        ds_compat.skip_cpu_shm_op_build()  # DeepSpeed's CPU all-reduce op (~40 s of g++): gloo needs none
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=par.timeout_minutes),
                                   dist_init_required=True)
    return DistInfo(rank, world, local_rank, device, backend)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduce_mean(values: torch.Tensor) -> list[float]:
    """Mean over the world of a small per-rank tensor (one all-reduce, one host sync)."""
    t = values.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


_control_group = None


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any. Runs over a gloo group on CPU tensors, so it never waits
    for the GPU stream (cheap enough to call every step)."""
    global _control_group
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())
