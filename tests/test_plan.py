"""jambatrain.plan: the arithmetic of a run, from the same Hydra config the trainer reads."""
from __future__ import annotations

import pytest

from jambatrain import plan


def test_model_state_bytes_follow_the_zero_accounting():
    n, gpus = 1_000, 8
    assert plan.model_state_bytes(n, 0, gpus)["total"] == 16 * n
    z1, z2, z3 = (plan.model_state_bytes(n, s, gpus) for s in (1, 2, 3))
    assert (z1["weights"], z1["grads"], z1["optimizer"]) == (2 * n, 2 * n, 12 * n / gpus)
    assert (z2["weights"], z2["grads"], z2["optimizer"]) == (2 * n, 2 * n / gpus, 12 * n / gpus)
    assert z3["total"] == pytest.approx(16 * n / gpus)


def test_expert_parallel_divides_the_experts_and_shards_their_states_over_the_rest():
    dense, experts, gpus = 1_000, 8_000, 8
    for ep in (1, 2, 4, 8):
        z1, z2 = (plan.model_state_bytes(dense, s, gpus, experts, ep) for s in (1, 2))
        assert z1["weights"] == z2["weights"] == 2 * (dense + experts / ep)  # each GPU holds 1/ep of the experts
        assert z1["grads"] == 2 * (dense + experts / ep)
        assert z2["grads"] == pytest.approx(2 * (dense + experts) / gpus)  # sharded over the EDP group of gpus/ep
        assert z1["optimizer"] == z2["optimizer"] == pytest.approx(12 * (dense + experts) / gpus)
    assert plan.model_state_bytes(dense, 0, gpus, experts, 4)["total"] == 16 * (dense + experts / 4)


def test_jamba_v0_1_ep8_zero2_on_8_gpus(tmp_path):
    p = plan.main(["--gpus", "8", "experiment=jamba_v0_1", f"data.dir={tmp_path}", "parallel.zero_stage=2",
                   "parallel.expert_parallel_size=8"])
    E = 16 * 16 * 3 * 14336 * 4096  # 16 MoE layers x 16 experts x 3 matrices
    assert p["expert_params"] == E and p["problems"] == []
    dense = p["params"] - E
    assert p["model_state_gb"][2]["weights"] == pytest.approx(2 * (dense + E / 8) / 1e9)
    assert p["model_state_gb"][2]["total"] < p["model_state_gb"][3]["total"] + 2 * dense / 1e9 * 2


def test_jamba_v0_1_on_64_gpus(capsys, tmp_path):
    p = plan.main(["--gpus", "64", "--tokens", "250e9", "--mfu", "0.3", "experiment=jamba_v0_1",
                   f"data.dir={tmp_path}"])
    assert p["params"] == 51_570_323_328 and p["active_params"] == 12_110_311_296
    assert p["tokens_per_step"] == 1 * 8 * 4096 * 64  # micro batch x accumulation x seq x GPUs
    assert p["model_state_gb"][3]["total"] == pytest.approx(16 * 51_570_323_328 / 64 / 1e9)
    # one MoE layer holds 16 experts x 3 x 14336 x 4096 weights: the largest module ZeRO-3 gathers
    assert p["zero3_largest_gathered_gb"] > 2 * 16 * 3 * 14336 * 4096 / 1e9
    assert p["days"] == pytest.approx(250e9 / (0.3 * 989e12 * 64 / p["flops_per_token"]) / 86400)
    assert p["problems"] == []
    assert p["gb_left_per_gpu"] == pytest.approx(141 - p["model_state_gb"][3]["total"] - p["zero3_largest_gathered_gb"])
    out = capsys.readouterr().out
    assert "ZeRO-3:" in out and "<- this config" in out and "days" in out and "DOES NOT FIT" not in out


def test_too_few_gpus_for_the_model_states_is_said(capsys, tmp_path):
    # 52B with ZeRO-3 on 4 GPUs: 16 bytes x 51.6B / 4 = 206 GB of model states per GPU
    p = plan.main(["--gpus", "4", "experiment=jamba_v0_1", f"data.dir={tmp_path}"])
    assert p["gb_left_per_gpu"] < 0 and "DOES NOT FIT" in capsys.readouterr().out


def test_a_config_that_cannot_run_on_that_many_gpus_is_reported(capsys):
    p = plan.main(["--gpus", "4", "experiment=tiny_cpu", "parallel.expert_parallel_size=3"])
    assert p["problems"] and "PROBLEM:" in capsys.readouterr().out


def test_plan_memory_and_eval_do_not_import_the_trainer(tmp_path):
    """The tools compose the config through jambatrain.runs (configs found by jambatrain.paths), not through the
    training entry point: no eval <-> train import cycle."""
    import subprocess
    import sys

    code = ("import sys, jambatrain.plan, jambatrain.memory, jambatrain.eval, jambatrain.export_hf; "
            "jambatrain.plan.main(['--gpus', '2', 'experiment=tiny_cpu']); "
            "jambatrain.memory.main(['--context', '64', 'experiment=tiny_cpu']); "
            "print('TRAINER', 'jambatrain.train' in sys.modules)")
    env = {**__import__("os").environ, "JAMBATRAIN_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == "TRAINER False"


def test_seq_len_left_to_the_manifest_is_read_from_it(tmp_path):
    """data=shards leaves data.seq_len to the shards' manifest; the plan reads it there, or says to set it."""
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({"seq_len": 1024}))
    args = ["--gpus", "2", "experiment=tiny_cpu", "data=shards", f"data.dir={tmp_path}", "parallel.micro_batch_size=2"]
    assert plan.main(args)["tokens_per_step"] == 2 * 2 * 1024
    with pytest.raises(SystemExit, match="data.seq_len=N"):
        plan.main(["--gpus", "2", "data=shards", f"data.dir={tmp_path}/none"])


def test_activations_split_over_cp_and_the_needed_cp_is_named(capsys):
    """Full recompute keeps each layer's input: Jamba v0.1 at 262,144 tokens keeps 32 x 4096 x 2 bytes per token
    = 64 GiB on one GPU, 1/cp of it under context parallelism; the 1.3b at 1M tokens on 8 H200s needs cp 4."""
    from jambatrain.runs import compose_train_config

    cfg = compose_train_config(["experiment=jamba_v0_1", "data.dir=/nonexistent", "data.seq_len=262144"])
    one, four = plan.activation_bytes(cfg, 1), plan.activation_bytes(cfg, 4)
    assert one["kept"] == 64 * 2**30 and four["kept"] == 16 * 2**30
    assert four["cp_buffers"] > 0 == one["cp_buffers"]
    p = plan.main(["--gpus", "8", "experiment=h200_1b", "data.seq_len=1048576", "parallel.micro_batch_size=1",
                   "model.activation_checkpointing=full", "model.loss_chunk_tokens=16384"])
    assert set(p["activations_gb"]) == {1, 2, 4, 8} and p["smallest_fitting_cp"] == 4
    assert "smallest context-parallel size that fits 90% of 141 GB: parallel.context_parallel_size=4" in \
        capsys.readouterr().out
