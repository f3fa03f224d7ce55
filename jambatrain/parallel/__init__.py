from .distributed import DistInfo, barrier, init_distributed, reduce_mean
from . import context_parallel, expert_parallel
from .deepspeed_setup import build_deepspeed_config, build_engine

__all__ = ["DistInfo", "barrier", "init_distributed", "reduce_mean", "build_deepspeed_config", "build_engine"]
