"""End-to-end CPU runs through the real stack: torchrun (2 gloo processes) -> Hydra -> DeepSpeed ZeRO-2 ->
webdataset shards -> checkpoints -> metrics.jsonl + offline W&B."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, free_port, run_proc

pytestmark = pytest.mark.slow


def run_train(env, run_dir, *overrides, nproc=2, check=True):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "jambatrain.train"]
    else:
        cmd = [sys.executable, "-m", "jambatrain.train"]
    cmd += ["experiment=tiny_cpu", f"hydra.run.dir={run_dir}", "trainer.progress_bar=false", *overrides]
    p = run_proc(cmd, cwd=REPO, env=env, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_torchrun_zero2_expert_parallel_loss_falls_then_resumes_at_ep1_and_on_one_rank(train_env, tmp_path):
    """tiny_cpu (4 experts, top-2) on 2 ranks with expert parallelism 2, then resumed with ep = 1 on 2 ranks, then on
    one rank: the loss keeps falling, the global batch is kept (grad accumulation 2 on one rank), one row a step."""
    run = str(tmp_path / "run")
    common = ["trainer.log_every=2", "trainer.save_every=6", "optim.warmup_steps=2", "optim.decay_steps=20",
              "parallel.zero_stage=2"]
    run_train(train_env, run, "trainer.max_steps=12", "parallel.expert_parallel_size=2", *common)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "aux_loss", "z_loss", "moe_max_over_mean_load",
                "moe_load/layer0", "moe_load/layer3", "ep_recv_max_over_mean", "ep_recv_tokens_max"):
        assert key in rows[-1], key
    assert rows[-1]["mfu"] is None  # no peak FLOPs on CPU
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows
    assert rows[-1]["ep_recv_max_over_mean"] >= 1.0
    assert rows[-1]["tokens"] == 12 * 2 * 4 * 256  # steps x ranks x micro batch x seq
    ckpts = os.path.join(run, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_00000012"
    assert sorted(t for t in os.listdir(ckpts) if t.startswith("step_")) == ["step_00000006", "step_00000012"]
    assert os.path.isdir(os.path.join(run, "wandb"))
    with open(os.path.join(run, "run_info.json")) as f:  # what ran: devices, versions, kernel paths
        info = json.load(f)
    assert info["world_size"] == 2 and info["fast_paths"]["mamba"] == "reference scan + eager doc conv"
    assert info["fast_paths"]["moe"] == "native loop, expert parallel 2"
    assert info["versions"]["deepspeed"] and info["versions"]["torch"].startswith("2.")

    # second invocation, without expert parallelism: resumes at step 12 and continues to 16 (not a restart)
    p = run_train(train_env, run, "trainer.max_steps=16", *common)
    assert "resumed from" in p.stdout + p.stderr
    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert "ep_recv_max_over_mean" not in rows[-1]

    # a third on one rank: the 2 ranks' checkpoint loads, the global batch of 8 sequences is kept
    p = run_train(train_env, run, "trainer.max_steps=20", *common, nproc=1)
    assert "keeping its global batch of 8 sequences with parallel.grad_accum_steps=2" in p.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert rows[-1]["tokens"] == 20 * 8 * 256
    assert rows[-1]["loss"] < rows[5]["loss"], rows  # still learning after two changes of topology
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_00000020"


def test_resume_is_exact(train_env, tmp_path):
    """8 steps straight == 4 steps, stop, resume to 8: same loss at every logged step (model, optimizer,
    LR schedule, RNG and data position all restored). Single process to keep CI time down."""
    common = ["trainer.log_every=1", "optim.warmup_steps=2", "optim.decay_steps=8", "trainer.save_every=100",
              "logger=none"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_train(train_env, straight, "trainer.max_steps=8", *common, nproc=1)
    run_train(train_env, split, "trainer.max_steps=4", *common, nproc=1)
    run_train(train_env, split, "trainer.max_steps=8", *common, nproc=1)
    a = {r["step"]: r["loss"] for r in metrics(straight)}
    b = {r["step"]: r["loss"] for r in metrics(split)}
    assert sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a, b)


def test_bad_inputs_fail_before_training_with_the_fix(train_env, tmp_path):
    # tokenizer vocabulary larger than the model's embedding: named, before any model is built
    p = run_train(train_env, str(tmp_path / "v2"), "model.vocab_size=1000", "trainer.max_steps=1", nproc=1,
                  check=False)
    assert p.returncode != 0
    assert "data.vocab_size=4096 exceeds model.vocab_size=1000" in p.stderr
    # missing data dir
    p = run_train(train_env, str(tmp_path / "m"), "data=shards", f"data.dir={tmp_path}/nope", "data.seq_len=256",
                  "trainer.max_steps=1", nproc=1, check=False)
    assert p.returncode != 0 and "does not exist" in p.stderr and "write_shards" in p.stderr
    # data=shards without data.dir: the key is named (not a default cache path the user never gave)
    p = run_train(train_env, str(tmp_path / "s"), "data=shards", "trainer.max_steps=1", nproc=1, check=False)
    assert p.returncode != 0 and "must be set: data.dir" in p.stderr and "cache" not in p.stderr
    # a mistyped data.dir with the default corpus: refused, no new corpus built there
    p = run_train(train_env, str(tmp_path / "t"), f"data.dir={tmp_path}/stdlib_pyy", "trainer.max_steps=1", nproc=1,
                  check=False)
    assert p.returncode != 0 and "holds no corpus" in p.stderr and "JAMBATRAIN_CACHE" in p.stderr
    assert not os.path.exists(tmp_path / "stdlib_pyy")
    # resume demanded but nothing to resume
    p = run_train(train_env, str(tmp_path / "r"), "trainer.resume=true", "trainer.max_steps=1", nproc=1,
                  check=False)
    assert p.returncode != 0 and "no complete checkpoint" in p.stderr
    assert not os.path.exists(os.path.join(tmp_path, "r", "metrics.jsonl"))
    # a kernel asked for by name that this machine cannot run (no CUDA here): refused at start-up, with the fix
    p = run_train(train_env, str(tmp_path / "k"), "model.mamba_impl=cuda", "trainer.max_steps=1", nproc=1,
                  check=False)
    assert p.returncode != 0 and "model.mamba_impl=cuda needs a CUDA device" in p.stderr
    assert "model.mamba_impl=auto" in p.stderr
    assert not os.path.exists(os.path.join(tmp_path, "k", "metrics.jsonl"))


def test_zero3_partitioned_init_and_export(train_env, tmp_path):
    """ZeRO-3 builds the model inside deepspeed.zero.Init (each rank holds a partition) and initialises it
    module by module, gathered. After one tiny step the consolidated weights still carry the init:
    A = -(1..n), D = 1, dt in [1e-3, 0.1], projections ~N(0, 0.02)."""
    import torch
    import torch.nn.functional as F

    run = str(tmp_path / "z3")
    run_train(train_env, run, "parallel=zero3", "trainer.max_steps=1", "optim.lr=1e-6", "logger=none")
    out = str(tmp_path / "hf")
    p = subprocess.run([sys.executable, "-m", "jambatrain.export_hf", run, out, "--dtype", "float32",
                        "--no-tokenizer"], cwd=REPO, env=train_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from safetensors.torch import load_file

    sd = load_file(os.path.join(out, "model.safetensors"))
    a_log = sd["model.layers.0.mamba.A_log"]
    n = a_log.shape[1]
    assert torch.allclose(a_log, torch.log(torch.arange(1, n + 1.0)).expand_as(a_log), atol=1e-3)
    assert torch.allclose(sd["model.layers.0.mamba.D"], torch.ones(a_log.shape[0]), atol=1e-3)
    dt = F.softplus(sd["model.layers.0.mamba.dt_proj.bias"])
    assert 0.9e-3 <= dt.min() and dt.max() <= 0.11
    std = sd["model.embed_tokens.weight"].std().item()
    assert 0.018 < std < 0.022, std


def test_validation_and_hydra_multirun(train_env, tmp_path):
    """`-m` sweeps two learning rates, one job dir each; trainer.eval_every logs val_loss from the val split."""
    sweep = str(tmp_path / "sweep")
    cmd = [sys.executable, "-m", "jambatrain.train", "-m", "experiment=tiny_cpu", "optim.lr=1e-3,2e-3",
           "trainer.max_steps=2", "trainer.eval_every=2", "trainer.eval_batches=2", "trainer.save_every=0",
           "logger=none", "trainer.progress_bar=false", f"hydra.sweep.dir={sweep}"]
    p = run_proc(cmd, cwd=REPO, env=train_env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        rows = metrics(os.path.join(sweep, job))
        val = [r for r in rows if "val_loss" in r]
        assert len(val) == 1 and val[0]["step"] == 2 and 0 < val[0]["val_loss"] < 20
        import yaml

        with open(os.path.join(sweep, job, "config.yaml")) as f:
            assert yaml.safe_load(f)["optim"]["lr"] == lr
    assert not os.path.exists(os.path.join(sweep, "0", "checkpoints"))  # save_every=0: none written


def test_multirun_through_the_submitit_launcher_runs_each_job_on_two_ranks(train_env, tmp_path):
    """`-m hydra/launcher=submitit_local` (the local twin of hydra/launcher=slurm_gpu): submitit starts each sweep
    job as 2 task processes with no torchrun; jambatrain exports the env:// variables from the task layout, so
    every job trains as one 2-rank ZeRO-2 world (two ranks' RNG and optimizer shards in its checkpoint)."""
    sweep = str(tmp_path / "sweep")
    cmd = [sys.executable, "-m", "jambatrain.train", "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.tasks_per_node=2", "experiment=tiny_cpu", "optim.lr=1e-3,2e-3", "trainer.max_steps=2",
           "logger=none", "trainer.progress_bar=false", f"hydra.sweep.dir={sweep}"]
    p = run_proc(cmd, cwd=REPO, env=train_env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for job in ("0", "1"):
        ckpt = os.path.join(sweep, job, "checkpoints", "step_00000002")
        assert sorted(f for f in os.listdir(ckpt) if f.startswith("rng_rank")) == ["rng_rank0.pt", "rng_rank1.pt"]
        rows = metrics(os.path.join(sweep, job))
        assert rows[-1]["step"] == 2 and rows[-1]["tokens"] == 2 * 2 * 4 * 256  # 2 ranks x micro batch 4


def test_profiling_writes_a_trace_per_rank_and_the_table(train_env, tmp_path):
    """trainer.profile_at: the chosen step is profiled on every rank (a Chrome trace each), rank 0 prints the
    time-by-op-class table (with expert parallelism's all-to-all as a class of its own), and that step is left out
    of the logged tokens/s."""
    run_dir = str(tmp_path / "prof")
    p = run_train(train_env, run_dir, "trainer.max_steps=3", "trainer.profile_at=2", "trainer.profile_steps=1",
                  "trainer.log_every=3", "trainer.save_every=0", "logger=none", "parallel.expert_parallel_size=2")
    traces = sorted(os.listdir(os.path.join(run_dir, "profile")))
    assert traces == ["steps2-2_rank0.json", "steps2-2_rank1.json"]
    with open(os.path.join(run_dir, "profile", traces[0])) as f:
        assert len(json.load(f)["traceEvents"]) > 100
    assert "time by class over 1 steps" in p.stdout and "gemm" in p.stdout and "aten::mm" in p.stdout
    assert "all-to-all" in p.stdout
    assert metrics(run_dir)[-1]["tokens_per_s"] > 0


def test_sigterm_checkpoints_at_the_next_step_and_exits(train_env, tmp_path):
    """Preemption (SLURM's --signal / scancel): the run checkpoints the step it is on, exits 0, and a restart
    resumes from exactly there."""
    import signal
    import time

    run = str(tmp_path / "pre")
    cmd = [sys.executable, "-m", "jambatrain.train", "experiment=tiny_cpu", f"hydra.run.dir={run}",
           "trainer.max_steps=100000", "trainer.save_every=100000", "trainer.log_every=1", "logger=none",
           "trainer.progress_bar=false"]
    p = subprocess.Popen(cmd, cwd=REPO, env=train_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(path) and len(open(path).readlines()) >= 3):
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "stop signal received" in out + err
    tag = open(os.path.join(run, "checkpoints", "latest")).read().strip()
    last = metrics(run)[-1]["step"]
    assert tag == f"step_{last:08d}" and last >= 3


def corpus_copy(train_env, tmp_path):
    """A private copy of the embedded corpus (built through a 1-step run if no test built it yet)."""
    src = os.path.join(train_env["JAMBATRAIN_CACHE"], "stdlib_py_v4096_s256")
    if not os.path.isdir(src):
        run_train(train_env, str(tmp_path / "warm"), "trainer.max_steps=1", "logger=none", nproc=1)
    shutil.copytree(src, str(tmp_path / "data"))
    return str(tmp_path / "data")


def test_skips_of_rank_1_are_counted_logged_checkpointed_and_survive_resume(train_env, tmp_path):
    """data.on_error=skip on 2 ranks with corrupt samples that only rank 1 reads: the run goes on, the skip
    warnings name shard and sample, and the count in metrics.jsonl, on the console and in the checkpoint is the
    sum over both ranks (what the loaders of the two ranks skip on their own). The resume (after an attempt
    that logged steps past the checkpoint) continues that count and keeps one metrics row per step."""
    from jambatrain.data import TokenShardLoader

    data = corpus_copy(train_env, tmp_path)
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    entry = manifest["splits"]["train"]["shards"][0]
    name, record = entry["name"], entry["record_bytes"]
    path = os.path.join(data, name)
    with open(path, "r+b") as f:  # unshuffled, 2 ranks x 4: rank 1 reads samples 8k+4..8k+7 (steps 1-6 here)
        for k in range(6):
            for i in range(8 * k + 4, 8 * k + 8):
                f.seek(i * record + 1024)
                f.write(b"\xff" * 8)

    def expected(batches):
        loaders = [TokenShardLoader(data, "train", 4, r, 2, shuffle=False, on_error="skip") for r in (0, 1)]
        for lo in loaders:
            for _, _ in zip(range(batches), lo):
                pass
        return [lo.skipped for lo in loaders]

    run = str(tmp_path / "run")
    common = ["data.prepare=none", f"data.dir={data}", "data.shuffle=false", "data.on_error=skip", "logger=none",
              "trainer.log_every=4", "trainer.save_every=2"]  # step 2's checkpoint falls between log steps
    p = run_train(train_env, run, "trainer.max_steps=4", *common)
    assert expected(2) == [0, 8] and expected(4) == [0, 16]  # old code: 0 logged, 0 checkpointed
    assert [(r["step"], r["skipped_samples"]) for r in metrics(run)] == [(4, 16)]
    for step, skipped in ((2, 8), (4, 16)):
        state = json.load(open(os.path.join(run, "checkpoints", f"step_{step:08d}", "train_state.json")))
        assert state["loader"]["skipped"] == skipped, step
    out = p.stdout + p.stderr
    assert f"rank 1 skipped a bad sample (data.on_error=skip; its row is left out of the loss): shard {path}: " \
           "sample 0000000004: checksum differs" in out
    assert "step 4: 16 bad samples skipped so far, all ranks (+8; " in p.stdout
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:  # an attempt that died after logging step 8
        f.write(json.dumps({"step": 8, "loss": 1.0, "skipped_samples": 32}) + "\n")
    run_train(train_env, run, "trainer.max_steps=6", *common)
    assert [(r["step"], r["skipped_samples"]) for r in metrics(run)] == [(4, 16), (6, 24)]
    assert expected(6) == [0, 24]
    assert [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.superseded.jsonl"))] == [1.0]


def test_corrupt_shard_mid_run_names_it_and_keeps_the_checkpoint(train_env, tmp_path):
    """A shard corrupted after a checkpoint was written: the run stops with the shard named and the fix, and
    the checkpoint it would resume from is untouched."""
    data = corpus_copy(train_env, tmp_path)
    run = str(tmp_path / "run")
    common = ["data.prepare=none", f"data.dir={data}", "logger=none", "trainer.save_every=2", "data.shuffle=false"]
    run_train(train_env, run, "trainer.max_steps=2", *common, nproc=1)
    ckpt = os.path.join(run, "checkpoints")
    before = {f: os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(ckpt) for f in fs}
    shard = os.path.join(data, "train-000000.tar")
    record = json.load(open(os.path.join(data, "manifest.json")))["splits"]["train"]["shards"][0]["record_bytes"]
    with open(shard, "r+b") as f:  # flip bytes inside the payload of sample 10 (read in step 3)
        f.seek(10 * record + 1024)
        chunk = f.read(64)
        f.seek(10 * record + 1024)
        f.write(bytes(b ^ 0xFF for b in chunk))
    p = run_train(train_env, run, "trainer.max_steps=4", *common, nproc=1, check=False)
    assert p.returncode != 0
    assert "train-000000.tar" in p.stderr and "rebuild the shards" in p.stderr
    after = {f: os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(ckpt) for f in fs}
    assert after == before and open(os.path.join(ckpt, "latest")).read().strip() == "step_00000002"


def test_slurm_sbatch_script_with_a_stand_in_srun(train_env, tmp_path):
    """launch/slurm.sbatch under stand-ins for srun and scontrol (one node, 2 CPU processes): the c10d
    rendezvous, the shared run dir runs/<job name>-<job id> and the overrides all reach the trainer.
    A requeue of the same job id resumes in the same run dir."""
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # scontrol: node names, and the job's comment (where the script keeps its run-dir token), which squeue reads
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\ncase "$1" in update) echo "${{3#Comment=}}" > {tmp_path}/comment;;'
                                      ' *) echo 127.0.0.1;; esac\n')
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ncat {tmp_path}/comment 2>/dev/null || echo '(null)'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    for f in ("scontrol", "squeue", "srun"):
        (bin_dir / f).chmod(stat.S_IRWXU)
    env = dict(train_env, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{train_env['PATH']}",
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="jt", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost",
               SLURM_SUBMIT_DIR=str(tmp_path), GPUS_PER_NODE="2", MASTER_PORT=str(free_port()))
    script = os.path.join(REPO, "launch", "slurm.sbatch")
    args = ["experiment=tiny_cpu", "trainer.max_steps=2", "trainer.log_every=1", "logger=none",
            "trainer.progress_bar=false"]
    p = subprocess.run(["bash", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run = tmp_path / "runs" / "jt-4242"
    assert [r["step"] for r in metrics(str(run))] == [1, 2]
    env["MASTER_PORT"] = str(free_port())
    p = subprocess.run(["bash", script, *args[:1], "trainer.max_steps=3", *args[2:]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    assert [r["step"] for r in metrics(str(run))] == [1, 2, 3]


def test_grad_accumulation_counts_tokens_and_steps_the_schedule_once_per_update(train_env, tmp_path):
    """Also runs the loader with 2 worker processes inside the trainer."""
    from jambatrain.config import OptimConfig
    from jambatrain.optim import lr_at

    run = str(tmp_path / "ga")
    run_train(train_env, run, "trainer.max_steps=3", "trainer.log_every=1", "parallel.grad_accum_steps=2",
              "trainer.save_every=0", "logger=none", "optim.lr=2e-3", "optim.warmup_steps=10",
              "data.num_workers=2", nproc=1)
    rows = metrics(run)
    opt = OptimConfig(lr=2e-3, warmup_steps=10)
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, opt, 3) for s in range(3)])
    assert [r["tokens"] for r in rows] == [2 * 4 * 256 * s for s in (1, 2, 3)]


def test_pretraining_starts_from_an_exported_hf_directory(train_env, tmp_path):
    """train -> export_hf -> `model.init_from=HF_DIR`: the new run starts from the trained weights (its first
    loss is the trained model's, far below a fresh init's), through the trainer and DeepSpeed."""
    common = ["trainer.log_every=1", "logger=none", "optim.warmup_steps=1", "optim.lr=3e-3"]
    src = str(tmp_path / "src")
    run_train(train_env, src, "trainer.max_steps=8", *common, nproc=1)
    hf_dir = str(tmp_path / "hf")
    p = subprocess.run([sys.executable, "-m", "jambatrain.export_hf", src, hf_dir, "--dtype", "float32"],
                       cwd=REPO, env=train_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    fresh, warm = str(tmp_path / "fresh"), str(tmp_path / "warm")
    run_train(train_env, fresh, "trainer.max_steps=1", "trainer.save_every=0", *common, nproc=1)
    pw = run_train(train_env, warm, "trainer.max_steps=1", "trainer.save_every=0", f"model.init_from={hf_dir}",
                   *common, nproc=1)
    assert f"model.init_from: loaded all" in pw.stdout and hf_dir in pw.stdout  # the run says it
    first_fresh, first_warm = metrics(fresh)[0]["loss"], metrics(warm)[0]["loss"]
    trained = metrics(src)[-1]["loss"]
    assert first_warm < first_fresh - 0.5, (first_warm, first_fresh, trained)
    assert first_warm < trained + 0.3, (first_warm, trained)  # no worse than the trained model on its own data
    # an init of another architecture: refused at start-up with every differing field, not inside a traceback
    p = run_train(train_env, str(tmp_path / "mismatch"), "trainer.max_steps=1", f"model.init_from={hf_dir}",
                  "model.num_hidden_layers=4", *common, nproc=1, check=False)
    assert p.returncode != 0 and "does not match the model config" in p.stderr and "num_hidden_layers" in p.stderr
    assert "Traceback" not in p.stderr and "parameters" not in p.stdout  # before the model was built
    assert not os.path.exists(os.path.join(warm, "train.log"))  # no empty Hydra log file in run dirs
    # a corrupted init: a NaN weight is refused at load, with the tensor named ...
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    bad_dir = str(tmp_path / "hf_nan")
    shutil.copytree(hf_dir, bad_dir)
    nan_w = {k: v.clone() for k, v in weights.items()}
    nan_w["model.final_layernorm.weight"][3] = float("nan")
    save_file(nan_w, os.path.join(bad_dir, "model.safetensors"))
    p = run_train(train_env, str(tmp_path / "nan"), "trainer.max_steps=1", f"model.init_from={bad_dir}", *common,
                  nproc=1, check=False)
    assert p.returncode != 0 and "model.final_layernorm.weight" in p.stderr and "NaN/inf" in p.stderr
    # ... and finite weights that overflow in the forward give a NaN loss: each step is skipped (no update), no
    # checkpoint is written inside the streak, and max_skipped_steps skips in a row stop the run with the reason
    huge_w = {k: v.clone() for k, v in weights.items()}
    huge_w["model.final_layernorm.weight"].fill_(3e38)
    save_file(huge_w, os.path.join(bad_dir, "model.safetensors"))
    run_dir = str(tmp_path / "diverge")
    p = run_train(train_env, run_dir, "trainer.max_steps=6", "trainer.save_every=2", "trainer.log_every=100",
                  "trainer.max_skipped_steps=3", f"model.init_from={bad_dir}", "logger=none", nproc=1, check=False)
    assert p.returncode != 0 and "3 optimizer steps in a row were skipped" in p.stderr, p.stderr[-2000:]
    assert "step 1 skipped (loss nan)" in p.stdout
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "step_00000002"))
