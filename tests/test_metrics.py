"""Throughput / MFU arithmetic and MoE load statistics."""
import pytest
import torch


def test_throughput_leaves_out_excluded_time(monkeypatch):
    from jambatrain import metrics

    clock = iter([100.0, 110.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = metrics.Throughput(train_flops_per_token=6e9, peak_flops_per_device=1e12, world_size=2)
    meter.add(10_000)
    meter.exclude(5.0)  # e.g. a checkpoint save: 10 s of wall time, 5 of them training
    r = meter.report()
    assert r["tokens_per_s"] == pytest.approx(2000.0)
    assert r["tokens_per_s_per_device"] == pytest.approx(1000.0)
    assert r["mfu"] == pytest.approx(1000.0 * 6e9 / 1e12)


def test_throughput_leaves_out_profiled_steps(monkeypatch):
    from jambatrain import metrics

    clock = iter([100.0, 110.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = metrics.Throughput(train_flops_per_token=6e9, peak_flops_per_device=None, world_size=1)
    meter.add(10_000)  # 4 steps of 2,500 tokens in 10 s, one of them profiled and 4 s long
    meter.exclude(4.0, tokens=2_500)
    assert meter.report()["tokens_per_s"] == pytest.approx(7_500 / 6.0)


def test_moe_load_stats_is_max_over_mean_averaged_over_layers():
    from jambatrain.metrics import moe_load_stats

    stats = moe_load_stats([torch.tensor([2, 2, 2, 2]), torch.tensor([6, 2, 0, 0])])
    assert stats["moe_max_over_mean_load"] == pytest.approx((1.0 + 3.0) / 2)
    assert moe_load_stats([]) == {}


def test_resume_keeps_one_row_per_step_and_moves_the_rest_aside(tmp_path):
    """A run logged steps 1..6, was checkpointed at 4 and died: the restart from step 4 keeps rows 1..4 in
    metrics.jsonl and moves 5, 6 and a line torn by the crash to metrics.superseded.jsonl."""
    import json

    from jambatrain.config import TrainConfig
    from jambatrain.metrics import MetricsLogger

    cfg = TrainConfig()
    cfg.logger.wandb = False
    first = MetricsLogger(cfg, str(tmp_path), True, {})
    for step in range(1, 7):
        first.log(step, {"loss": float(step)})
    first.file.write('{"step": 7, "lo')  # killed mid-write
    first.close()
    second = MetricsLogger(cfg, str(tmp_path), True, {})
    assert second.resume_at(4) == 3
    for step in (5, 6):
        second.log(step, {"loss": step + 0.5})
    second.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.5), (6, 6.5)]
    moved = open(tmp_path / "metrics.superseded.jsonl").read().splitlines()
    assert [json.loads(line)["step"] for line in moved[:2]] == [5, 6] and moved[2] == '{"step": 7, "lo'
    assert MetricsLogger(cfg, str(tmp_path), False, {}).resume_at(0) == 0  # other ranks: nothing
