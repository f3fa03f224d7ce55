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
