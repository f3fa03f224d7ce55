"""Every private DeepSpeed hook of jambatrain/parallel/ds_compat.py, one test each: what it relies on in DeepSpeed
still exists with the shape it had (so a DeepSpeed upgrade fails here, naming the hook, instead of deep inside a
run), and, on a real engine per ZeRO stage (tests/ep_worker.py hooks), that it still does its job."""
from __future__ import annotations

import inspect
import re

import pytest
import torch

from conftest import REPO
from jambatrain.parallel import ds_compat


def _source(obj) -> str:
    return inspect.getsource(obj)


def _assigns(cls, attr: str) -> bool:
    return re.search(rf"self\.{attr}\s*=", _source(cls)) is not None


@pytest.fixture(scope="module")
def engines():
    """The hooks on a real engine of every ZeRO stage and precision (one process, gloo; ~15 s)."""
    from test_expert_parallel import worker

    return worker(1, "hooks")


def test_version_pin_is_pyprojects_and_another_version_is_refused(monkeypatch):
    pin = re.search(r'"deepspeed>=([\d.]+),<([\d.]+)"', open(f"{REPO}/pyproject.toml").read())
    assert pin, "pyproject.toml no longer pins deepspeed as >=A,<B"
    lo, hi = ds_compat.SUPPORTED
    assert (pin[1], pin[2]) == (".".join(map(str, lo)), ".".join(map(str, hi[:2])))
    assert ds_compat.version_problem() is None  # the installed one
    for bad in ("0.19.7", "0.20.0", "0.21.1+cu124"):
        assert "pip install 'deepspeed>=0.19.8,<0.20'" in ds_compat.version_problem(bad)
    monkeypatch.setattr("deepspeed.__version__", "0.20.0")
    ds_compat.check_version.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="DeepSpeed 0.20.0 is installed"):
            ds_compat.check_version()
        monkeypatch.setenv("JAMBATRAIN_UNTESTED_DEEPSPEED", "1")
        ds_compat.check_version()  # a warning only
    finally:
        ds_compat.check_version.cache_clear()


def test_skip_hook(engines):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    # ZeRO-1/2: step() calls check_overflow when check_grad_overflow is on
    assert _assigns(DeepSpeedZeroOptimizer, "check_grad_overflow")
    assert "if self.check_grad_overflow:\n            self.check_overflow(" in _source(DeepSpeedZeroOptimizer.step)
    # ZeRO-3: the overflow check is a method of this signature, followed by the scale update / clean-up
    assert "def _overflow_check_and_loss_scale_update(self, update_scale=True):" in \
        _source(DeepSpeedZeroOptimizer_Stage3)
    assert "_loss_scale_update_and_overflow_cleanup" in dir(DeepSpeedZeroOptimizer_Stage3)
    assert "check_overflow" in dir(DeepSpeedZeroOptimizer_Stage3)
    # BF16_Optimizer: the gradient clean-up and the norm attribute the hook sets
    for name in ("clear_hp_grads", "clear_lp_grads", "step"):
        assert callable(getattr(BF16_Optimizer, name, None)), name
    assert _assigns(BF16_Optimizer, "_global_grad_norm")
    # the engine: an optimizer reporting overflow is a skipped step (no schedule step, skipped_steps counted)
    take = _source(DeepSpeedEngine._take_model_step)
    assert "self.optimizer.overflow" in take and "self.skipped_steps += 1" in take
    # and on real engines: every path skips (masters, moments, schedule unchanged, counted), then applies again
    paths = {case: r["path"] for case, r in engines.items() if "path" in r}
    assert paths == {"zero0_fp32": "torch", "zero0_bf16": "torch", "zero1_fp32": "zero12", "zero2_fp32": "zero12",
                     "zero3_fp32": "zero3", "zero1_bf16-fp32acc": "bf16"}
    for case in paths:
        r = engines[case]
        assert r["skip_unchanged"] and r["schedule_held"] and r["skip_counted"] == 1 and r["applied_changed"], r


def test_relink_optimizer_state(engines):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (DeepSpeedZeroOptimizer, BF16_Optimizer):
        lazy = _source(cls._lazy_init_hp_params_optimizer_state)
        assert "if not self._hp_optimizer_states_linked:" in lazy, cls
        assert "self._hp_optimizer_states_linked = True" in lazy, cls
    # every parameter group's Adam moments are reachable after a step (the re-link; ZeRO-0 bf16: zero0_fp32_masters)
    for case, r in engines.items():
        if "moments_everywhere" in r:
            assert r["moments_everywhere"], case


def test_fp32_partitions(engines):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert _assigns(DeepSpeedZeroOptimizer, "single_partition_of_fp32_groups")
    assert _assigns(BF16_Optimizer, "fp32_groups_flat_partition")
    got = {case: r["fp32_partitions"] for case, r in engines.items() if "path" in r}
    assert got == {"zero0_fp32": None, "zero0_bf16": None, "zero1_fp32": 2, "zero2_fp32": 2, "zero3_fp32": None,
                   "zero1_bf16-fp32acc": 2}  # two groups: decay and no decay


def test_zero0_fp32_masters(engines):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    # FP16_UnfusedOptimizer: fp32 copies, parallel to the model's parameters, are what the torch optimizer steps,
    # copied into the parameters after each step
    init, step = _source(FP16_UnfusedOptimizer.__init__), _source(FP16_UnfusedOptimizer.step)
    assert "self.fp16_groups.append(trainable)" in init
    assert "fp32_group = [p.clone().float().detach() for p in self.fp16_groups[i]]" in init
    assert "param_group['params'] = self.fp32_groups[i]" in init
    assert "fp16_param.data.copy_(fp32_param.data)" in step
    # which engines have such masters: ZeRO-0 with bf16 weights, every parameter; nowhere else
    assert {case: r["optimizer"] for case, r in engines.items() if "path" in r}["zero0_bf16"] == \
        "FP16_UnfusedOptimizer"
    got = {case: r["zero0_masters"] for case, r in engines.items() if "path" in r}
    bf16 = got.pop("zero0_bf16")
    assert bf16["count"] > 0 and bf16["all_params"] and bf16["consistent"], bf16
    assert all(v == {"count": 0, "all_params": False, "consistent": True} for v in got.values()), got


def test_drop_construction_step(engines):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    # FP16_UnfusedOptimizer steps once on zero gradients when it is built; no other optimizer wrapper does
    assert "self.initialize_optimizer_states()" in _source(FP16_UnfusedOptimizer.__init__)
    assert "self.optimizer.step()" in _source(FP16_UnfusedOptimizer.initialize_optimizer_states)
    # undone on the real engines (train.setup's build_engine): every stage counts the two steps it applied
    got = {case: r["adam_step"] for case, r in engines.items() if "path" in r}
    assert got == dict.fromkeys(got, 2.0) and "zero0_bf16" in got, got


def test_has_fp32_fragment(engines):
    from deepspeed.utils import mixed_precision_linkage

    assert "lp_param._hp_mapping = " in _source(mixed_precision_linkage)
    got = {case: r["fragments"] for case, r in engines.items() if "path" in r}
    assert got == {"zero0_fp32": [False], "zero0_bf16": [False], "zero1_fp32": [True], "zero2_fp32": [True],
                   "zero3_fp32": [True], "zero1_bf16-fp32acc": [True]}


def test_set_schedule_position(engines):
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert _assigns(DeepSpeedEngine, "global_steps")
    assert '_get_optimizer_param("lr")' in _source(DeepSpeedEngine.get_lr)  # the groups' rates, which the hook sets
    # torch's LambdaLR: get_last_lr returns _last_lr, which the hook sets
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)

    class Engine:
        lr_scheduler, global_steps = s, 0

    ds_compat.set_schedule_position(Engine, 9, 3)
    assert (Engine.global_steps, s.last_epoch, s.get_last_lr(), opt.param_groups[0]["lr"]) == (9, 3, [0.125], 0.125)
    s.step()
    assert s.get_last_lr() == [0.0625]
    for r in engines.values():
        if "schedule_position" in r:
            assert r["schedule_position"] == [7, 5, True], r


def test_expert_groups(engines):
    from deepspeed.utils import groups

    sig = inspect.signature(groups._create_expert_and_data_parallel)
    assert list(sig.parameters)[0] == "expert_parallel_size_"
    for name in ("_get_expert_parallel_group_dict", "_get_expert_parallel_rank", "_get_expert_parallel_group",
                 "_get_expert_data_parallel_group", "_get_expert_data_parallel_rank"):
        assert callable(getattr(groups, name, None)), name
    assert "ep_size_{" in _source(groups._create_expert_and_data_parallel)  # the names ZeRO looks groups up by
    assert engines["expert_groups"] == {"name": "ep_size_1", "rank": 0, "edp_rank": 0}
    # world > 1 (ep 2 and 4 out of 4 ranks): tests/test_expert_parallel.py


def test_mark_as_deepspeed_moe():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.runtime.engine import DeepSpeedEngine

    from jambatrain.models import ModelConfig
    from jambatrain.models.moe import MoE

    # the attributes the engine reads from its MoE layers
    engine_src = _source(DeepSpeedEngine)
    assert "isinstance(module, MoE)" in engine_src
    for attr in ("num_experts", "num_local_experts", "expert_group_name"):
        assert f"module.{attr}" in engine_src, attr
    torch.manual_seed(0)
    layer = MoE(ModelConfig(hidden_size=8, intermediate_size=12, num_experts=4, num_experts_per_tok=2,
                            compile_elementwise=False, moe_impl="native"))
    for w in (layer.w_gate, layer.w_up, layer.w_down):
        torch.nn.init.normal_(w, 0, 0.1)
    x = torch.randn(5, 8)
    before = layer(x)[0]
    ds_compat.mark_as_deepspeed_moe(layer, 2, 2, "ep_size_2")
    assert isinstance(layer, DeepSpeedMoE) and isinstance(layer, MoE)
    assert (layer.ep_size, layer.num_local_experts, layer.expert_group_name, layer.num_experts) == \
        (2, 2, "ep_size_2", 4)
    assert layer.set_deepspeed_parallelism() is None  # DeepSpeed's own group set-up never runs
    assert torch.equal(layer(x)[0], before)  # still jambatrain's forward


def test_skip_cpu_shm_op_build(monkeypatch):
    import importlib

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    assert "self.shm_comm_op = build_shm_op()" in _source(ds_torch_comm.TorchBackend.__init__)
    monkeypatch.setattr(ds_torch_comm, "build_shm_op", ds_torch_comm.build_shm_op)  # restored after the test
    ds_compat.skip_cpu_shm_op_build()
    assert ds_torch_comm.build_shm_op() is None
    monkeypatch.delattr(ds_torch_comm, "build_shm_op")
    with pytest.raises(RuntimeError, match="build_shm_op is gone"):
        ds_compat.skip_cpu_shm_op_build()


def test_every_private_deepspeed_access_is_in_ds_compat():
    """No other module of jambatrain reaches into DeepSpeed's private names or the hook attributes."""
    import glob

    private = re.compile(r"groups\._|_hp_mapping|_hp_optimizer_states|_lazy_init_hp|check_grad_overflow|"
                         r"_overflow_check_and_loss_scale_update|build_shm_op|single_partition_of_fp32_groups|"
                         r"fp32_groups_flat_partition|\bfp(16|32)_groups\b|_last_lr|global_steps\s*=|__class__\s*=")
    offenders = []
    for path in glob.glob(f"{REPO}/jambatrain/**/*.py", recursive=True):
        if path.endswith("ds_compat.py"):
            continue
        for i, line in enumerate(open(path), 1):
            if private.search(line):
                offenders.append(f"{path}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_guard_without_the_hook_stops_rather_than_apply_a_bad_step():
    """StepGuard only decides; the skip happens in the hook ``train.setup`` installs. A forced skip the engine did
    not count (no hook) is an error, not a silently applied bad step."""
    from jambatrain.step_guard import StepGuard

    class Engine:
        skipped_steps = 0

    guard = StepGuard(Engine(), spike_factor=5.0, spike_warmup=0, max_skipped=3)
    assert guard.check(torch.tensor(float("nan")), 1) == "loss nan" and guard.skip_requested()
    with pytest.raises(RuntimeError, match="the skip hook is not installed"):
        guard.after_step(skipped_before=0)
    Engine.skipped_steps = 1  # as DeepSpeed counts a step the hook skipped
    guard.check(torch.tensor(float("nan")), 1)
    assert guard.after_step(skipped_before=0) and not guard.skip_requested()
