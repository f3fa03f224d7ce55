"""data=mqar_zoology: the generator against Zoology's own function, the loader's batching, the model options the
recipe needs (no FFN, short-conv token shift), the eval task, and the CPU toy of bench/mqar_zoology.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jambatrain.data.mqar import (MqarZoologyConfig, MqarZoologyLoader, zoology_segment, zoology_segment_seeds,
                                  zoology_segments)
from jambatrain.models import JambaLM, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_multiquery_ar(vocab_size, num_examples, input_seq_len, seed, power_a=0.01, num_kv_pairs=8,
                             num_passes=1, random_non_queries=True):
    """Verbatim (less the docstring and the DataSegment wrapper) from HazyResearch/zoology, commit
    dbcb60d2bd10a3cc7a89ee60c446c44900a4687f, zoology/data/multiquery_ar.py (Apache License 2.0)."""
    assert input_seq_len % 2 == 0, "input_seq_len must be even"
    assert vocab_size > input_seq_len
    assert num_kv_pairs * 2 * num_passes + num_kv_pairs * 2 <= input_seq_len

    np.random.seed(seed)

    # two tokens for key and value
    context_size = num_kv_pairs * 2 * num_passes

    # create keys so that each key is present exactly once in each example
    key_vocab_size = vocab_size // 2
    key_choices = np.arange(1, key_vocab_size)
    value_choices = np.arange(key_vocab_size, vocab_size)

    keys_unshuffled = np.tile(key_choices, (num_examples, 1))
    keys = np.apply_along_axis(np.random.choice, 1, keys_unshuffled, replace=False, size=num_kv_pairs)

    values_unshuffled = np.tile(value_choices, (num_examples, 1))
    values = np.apply_along_axis(np.random.choice, 1, values_unshuffled, replace=False, size=num_kv_pairs)

    # create sequences
    kvs = np.zeros((num_examples, context_size), dtype=np.int64)
    kvs[:, 0::2] = keys
    kvs[:, 1::2] = values
    kvs = np.tile(kvs, (1, num_passes))

    # compute power law
    space = (input_seq_len - context_size) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a-1)
    p = p / p.sum()

    x = np.stack([np.arange(space, dtype=int)] * num_examples)
    gaps = np.apply_along_axis(np.random.choice, axis=1, arr=x, replace=False, p=p, size=num_kv_pairs)

    # queries and answers
    queries = np.zeros((num_examples, input_seq_len - context_size + 1), dtype=np.int64)
    np.put_along_axis(queries, (gaps * 2), values=keys, axis=1)
    examples = np.concatenate([
        kvs,
        queries
    ], axis=1)

    labels = np.full((num_examples, input_seq_len + 1), -100, dtype=np.int64)
    np.put_along_axis(labels, (gaps * 2) + context_size + 1, values=values, axis=1)

    inputs, labels = torch.tensor(examples[:, :-1]), torch.tensor(labels[:, 1:])

    # replace all the 0 with random values
    if random_non_queries:
        inputs[inputs == 0] = torch.randint(vocab_size, size=inputs.shape)[inputs == 0]
    return inputs, labels


@pytest.mark.parametrize("vocab,seq_len,pairs,n,seed", [(8192, 64, 4, 40, 7), (8192, 256, 64, 6, 2**31 + 5),
                                                       (512, 128, 32, 9, 3)])
def test_segment_is_zoologys_draw_for_draw(vocab, seq_len, pairs, n, seed):
    torch.manual_seed(seed)  # Zoology's noise comes from the global torch RNG; ours from a generator seeded alike
    ref_inputs, ref_labels = _reference_multiquery_ar(vocab, n, seq_len, seed, num_kv_pairs=pairs)
    inputs, labels = zoology_segment(vocab, seq_len, pairs, n, seed)
    np.testing.assert_array_equal(inputs, ref_inputs.numpy())
    np.testing.assert_array_equal(labels, ref_labels.numpy())


def test_segment_structure():
    vocab, seq_len, pairs = 8192, 128, 8
    inputs, labels = zoology_segment(vocab, seq_len, pairs, 300, seed=11)
    assert inputs.shape == labels.shape == (300, seq_len)
    for x, y in zip(inputs, labels):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs  # unique per sequence
        assert keys.min() >= 1 and keys.max() < vocab // 2 and values.min() >= vocab // 2 and values.max() < vocab
        q = np.flatnonzero(y != -100)
        assert len(q) == pairs and q.min() >= 2 * pairs and (q % 2 == 0).all()  # each key asked once, after the pairs
        assert sorted(x[q]) == sorted(keys) and dict(zip(keys, values)) == dict(zip(x[q], y[q]))
    # power-law gaps (a = 0.01): the first query slot is by far the most likely
    gaps = np.concatenate([(np.flatnonzero(y != -100) - 2 * pairs) // 2 for y in labels])
    counts = np.bincount(gaps, minlength=(seq_len - 2 * pairs) // 2)
    assert counts[0] > 3 * counts[10] > 0


def test_seeds_are_zoologys_and_test_seeds_differ():
    np.random.seed(123)  # zoology/data/utils.py prepare_data
    train = np.random.randint(0, 2 ** 31, size=5)
    test = np.random.randint(2 ** 31, 2 ** 32, size=7)
    ours = zoology_segment_seeds(123, 5, 7)
    assert ours == ([int(s) for s in train], [int(s) for s in test])
    assert not set(ours[0]) & set(ours[1])


def _small_cfg(tmp_path=None) -> MqarZoologyConfig:
    return MqarZoologyConfig(vocab=256, train=[[16, 2, 10], [32, 4, 7]], test=[[16, 2, 5], [64, 8, 3]],
                             cache_dir=str(tmp_path) if tmp_path else "")


def test_loader_batches_one_length_each_in_zoology_order(tmp_path):
    cfg = _small_cfg(tmp_path)
    loader = MqarZoologyLoader(cfg, "train", 4, 0, 1)
    assert loader.batches_per_epoch == 3 + 2  # ceil(10/4) + ceil(7/4): the last batch of a segment is smaller
    it = iter(loader)
    shapes = [tuple(next(it)["input_ids"].shape) for _ in range(6)]
    assert shapes == [(4, 16), (4, 16), (2, 16), (4, 32), (3, 32), (4, 16)]  # segment order, then epoch 2
    assert loader.epoch == 1
    # cached: a second loader memory-maps the same arrays
    assert len(list(tmp_path.iterdir())) == 2
    again = MqarZoologyLoader(cfg, "train", 4, 0, 1)
    np.testing.assert_array_equal(again.make_batch(3)["labels"], loader.make_batch(3)["labels"])
    # resume continues with the next batch
    sd = loader.state_dict()
    fresh = MqarZoologyLoader(cfg, "train", 4, 0, 1)
    fresh.load_state_dict(sd)
    np.testing.assert_array_equal(next(iter(fresh))["input_ids"], loader.make_batch(6)["input_ids"])
    # two ranks split each global batch; together they see every row once per epoch
    rows = []
    for r in range(2):
        ld = MqarZoologyLoader(cfg, "train", 2, r, 2)
        rows += [tuple(t) for g in range(ld.batches_per_epoch) for t in ld.make_batch(g)["input_ids"].tolist()]
    assert len(rows) == 17 and sorted(rows) == sorted(
        tuple(t) for inp, _ in zoology_segments(cfg, "train") for t in inp.tolist())
    # shuffle: a permutation of the same batches
    sh = MqarZoologyLoader(cfg, "train", 4, 0, 1, seed=1, shuffle=True)
    assert sorted(sh.make_batch(g)["input_ids"].shape[0] for g in range(5)) == [2, 3, 4, 4, 4]
    # the val split is the test segments
    val = MqarZoologyLoader(cfg, "val", 4, 0, 1)
    assert [tuple(b["input_ids"].shape) for b in val] == [(4, 16), (1, 16), (3, 64)]


def test_config_refuses_a_bad_segment():
    cfg = MqarZoologyConfig(vocab=256, train=[[15, 2, 10]], test=[[64, 20, 3]])
    msg = "; ".join(cfg.problems(128))
    assert "exceeds model.vocab_size=128" in msg and "[15, 2, 10]" in msg and "[64, 20, 3]" in msg


def _tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=32, intermediate_size=0, num_hidden_layers=2, num_attention_heads=1,
                num_key_value_heads=1, num_experts=1, mamba_d_state=4, tie_word_embeddings=True)
    return ModelConfig(**{**base, **kw})


def test_no_ffn_and_short_conv_layers():
    cfg = _tiny(attn_layer_period=2, attn_layer_offset=1, short_conv_layer_period=2)
    assert cfg.layer_pattern() == "c- a-"
    model = JambaLM(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any("ffn" in n or "pre_ff" in n for n in names)
    assert "layers.0.mixer.conv.weight" in names and "layers.0.mixer.projection.bias" in names
    # the conv mixer is causal: changing token t changes no output before t
    x = torch.randint(256, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 256
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.equal(a[:, 7:], b[:, 7:])
    hybrid = _tiny(attn_layer_period=2, attn_layer_offset=1)
    assert hybrid.layer_pattern() == "m- a-"
    assert ModelConfig(**{**_tiny().__dict__, "intermediate_size": 0, "num_experts": 4}).problems()


def test_eval_task_counts_query_positions_only():
    from jambatrain.config import TrainConfig
    from jambatrain.eval import mqar_zoology_metrics

    cfg = TrainConfig()
    cfg.data.mqar_zoology = _small_cfg()
    cfg.model = _tiny(attn_layer_period=2, attn_layer_offset=1, short_conv_layer_period=2)
    cfg.parallel.micro_batch_size = 2

    class Oracle(torch.nn.Module):  # knows the answers: logits peak at the label where there is one
        def __init__(self, segs):
            super().__init__()
            self.answers = {tuple(x.tolist()): y for inp, lab in segs for x, y in zip(inp, lab)}
            self.lm_head = torch.nn.Identity()

        def hidden_states(self, ids, doc_starts=None):
            out = torch.zeros(*ids.shape, 256)
            for i, row in enumerate(ids):
                y = torch.as_tensor(np.asarray(self.answers[tuple(row.tolist())], dtype=np.int64))
                keep = y != -100
                out[i, keep, y[keep]] = 1.0
                out[i, ~keep, 0] = 1.0  # wrong everywhere else: must not count
            return out, None, None

    segs = zoology_segments(cfg.data.mqar_zoology, "test")
    res = mqar_zoology_metrics(Oracle(segs), cfg, torch.device("cpu"))
    assert res["mqar_zoology_acc"] == 1.0 and res["mqar_zoology"] == {"L16_N2": 1.0, "L64_N8": 1.0}


def test_loss_labeled_only_is_the_same_loss_and_gradient():
    torch.manual_seed(0)
    cfg = _tiny(attn_layer_period=2, attn_layer_offset=1)
    full = JambaLM(cfg)
    part = JambaLM(ModelConfig(**{**cfg.__dict__, "loss_labeled_only": True}))
    part.load_state_dict(full.state_dict())
    inputs, labels = zoology_segment(256, 32, 4, 3, seed=5)
    ids, lab = torch.from_numpy(inputs), torch.from_numpy(labels)
    a = full(ids, labels=lab, return_logits=False)
    b = part(ids, labels=lab, return_logits=False)
    torch.testing.assert_close(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    for (n, p), q in zip(full.named_parameters(), part.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_bench_toy_runs_the_grid_through_the_trainer_and_eval(tmp_path):
    """The CPU toy of bench/mqar_zoology.py: probe, a Hydra multirun per arm, jambatrain.eval, the table."""
    out = tmp_path / "mqz"
    r = subprocess.run([sys.executable, "bench/mqar_zoology.py", "run", "--toy", "--out", str(out), "--arms",
                        "attention_d64,hybrid_d64", "--lrs", "1e-2,3e-2", "--procs", "2", "--epochs", "1",
                        "--budget-s", "300", "--probe-steps", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out / "mqar_zoology.json"))
    assert res["epochs"] == 1 and res["steps_per_epoch"] == 6 and res["probe_step_s"] > 0
    assert [a["arm"] for a in res["arms"]] == ["attention_d64", "hybrid_d64"]
    assert len(res["runs"]) == 4 and {r["run_dir"].rsplit("/", 1)[-1] for r in res["runs"]} == {"0", "1"}
    for run in res["runs"]:  # each arm's two lrs: one Hydra multirun (jobs 0 and 1) in one trainer process
        assert run["steps"] == 6 and 0 <= run["acc"] <= 1 and set(run["acc_by_segment"]) == {"L16_N2", "L64_N8"}
        assert len(run["acc_during_training"]) == 1  # the trainer's eval at the epoch's end
        assert os.path.isfile(out / run["run_dir"] / ".hydra" / "overrides.yaml")  # a Hydra multirun job
    assert "| attention | 16 |" in open(out / "mqar_zoology.md").read()
    docs = tmp_path / "results.md"
    docs.write_text("a\n<!-- mqar_zoology:table -->\nold\n<!-- /mqar_zoology:table -->\nb\n")
    subprocess.run([sys.executable, "bench/mqar_zoology.py", "report", str(out / "mqar_zoology.json"), "--docs",
                    str(docs)], cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ROOT})
    text = docs.read_text()
    assert "old" not in text and "| hybrid [mamba N16, attention] | 16 |" in text and text.endswith("b\n")


def test_trainer_stops_early_past_the_metric_with_a_checkpoint(tmp_path):
    """trainer.stop_metric: the run ends (checkpointed) at the first eval whose metric exceeds trainer.stop_above."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from mqar_zoology import TOY

    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "jambatrain.train", "experiment=zoology_attention", *TOY,
                        "model.hidden_size=16", f"data.mqar_zoology.cache_dir={tmp_path / 'cache'}",
                        "trainer.max_steps=12", "trainer.eval_every=3", "trainer.stop_above=-1.0",
                        f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "mqar_zoology_acc" in r.stdout and "stopping early" in r.stdout
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000003"]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert max(row["step"] for row in rows) == 3
    # jambatrain.eval loads the tied checkpoint tied (load_state_dict(assign=True) gave the head its own tensor:
    # twice the embedding's memory and a parameter count 524,288 too high at d 64)
    from jambatrain.eval import compose_config, load_model

    cfg, root, tag, _ = compose_config(str(run), [])
    model = load_model(cfg, root, tag, torch.device("cpu"), torch.float32)
    assert cfg.model.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    assert model.num_params() == JambaLM(cfg.model).num_params()


def test_hf_export_refuses_the_zoology_layers():
    from jambatrain.hf_convert import to_hf_config

    for cfg in (_tiny(), _tiny(intermediate_size=64, short_conv_layer_period=2)):
        with pytest.raises(ValueError, match="no Hugging Face Jamba equivalent"):
            to_hf_config(cfg)


class _Calls(torch.overrides.TorchFunctionMode):
    """Records the name of every torch function called under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_loss_labeled_only_with_a_host_count_gathers_without_nonzero():
    """With the label count given (the trainer counts it on the CPU batch), the labelled-only loss gathers its
    positions with nonzero_static, which needs no device sync; nonzero (a sync on CUDA) is not called. Same loss and
    gradient as without the count."""
    torch.manual_seed(0)
    model = JambaLM(_tiny(attn_layer_period=2, attn_layer_offset=1, loss_labeled_only=True))
    inputs, labels = zoology_segment(256, 32, 4, 3, seed=5)
    ids, lab = torch.from_numpy(inputs), torch.from_numpy(labels)
    ref = model(ids, labels=lab, return_logits=False)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with _Calls() as calls:
        out = model(ids, labels=lab, return_logits=False, num_labeled=int((lab != -100).sum()))
    assert "nonzero" not in calls.names and "nonzero_static" in calls.names
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_train_step_passes_the_host_label_count():
    """train_step counts the labels on the CPU batch and hands the count to the model (with loss_labeled_only)."""
    from types import SimpleNamespace

    from jambatrain.train import train_step

    seen = []

    class Engine:
        skipped_steps = 0
        module = torch.nn.Linear(2, 2)  # the model DeepSpeed's engine wraps (train_step tells its FP8 cache)

        def __call__(self, **kw):
            seen.append(kw.get("num_labeled"))
            z = torch.zeros((), requires_grad=True)
            return SimpleNamespace(loss=z, ce_loss=z, aux_loss=z, z_loss=z)

        def backward(self, loss):
            pass

        def step(self):
            pass

    inputs, labels = zoology_segment(256, 32, 4, 3, seed=5)
    batch = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}
    guard = SimpleNamespace(after_step=lambda before: False)
    for labeled_only, want in ((True, 12), (False, None)):
        cfg = SimpleNamespace(parallel=SimpleNamespace(grad_accum_steps=1), trainer=SimpleNamespace(step_guard=False),
                              model=SimpleNamespace(loss_labeled_only=labeled_only),
                              data=SimpleNamespace(doc_mask=False, kind="mqar_zoology"))
        train_step(Engine(), iter([batch]), guard, cfg, SimpleNamespace(device=torch.device("cpu")))
        assert seen[-1] == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_loss_labeled_only_makes_no_device_sync_on_cuda():
    model = JambaLM(_tiny(attn_layer_period=2, attn_layer_offset=1, loss_labeled_only=True,
                          compile_elementwise=False)).cuda()
    inputs, labels = zoology_segment(256, 32, 4, 3, seed=5)
    ids, lab = torch.from_numpy(inputs).cuda(), torch.from_numpy(labels).cuda()
    n = int((torch.from_numpy(labels) != -100).sum())
    model(ids, labels=lab, return_logits=False, num_labeled=n)  # warm-up: lazy init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(ids, labels=lab, return_logits=False, num_labeled=n)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()


def _mamba_ab():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mqar_mamba_ab", os.path.join(ROOT, "bench", "mqar_mamba_ab.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mamba_without_dt_bc_norm_is_zoologys_mamba():
    """model.mamba_dt_bc_norm=false: Jamba's mixer computes Zoology's Mamba-1 (the port in bench/mqar_mamba_ab.py,
    with mamba_ssm's selective_scan_ref token loop) given the same weights; with the norms (the default) it does
    not, and it has the norms' parameters."""
    from jambatrain.models.mamba import MambaMixer

    ab = _mamba_ab()
    torch.manual_seed(0)
    zoo = ab.ZMamba(32, d_state=8)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        want = zoo(x, loop=True)
        torch.testing.assert_close(zoo(x), want, rtol=1e-5, atol=1e-6)  # the port's fast scan = its loop
        for norm in (False, True):
            mixer = MambaMixer(_tiny(hidden_size=32, mamba_d_state=8, mamba_dt_bc_norm=norm, mamba_impl="reference"))
            missing, unexpected = mixer.load_state_dict(zoo.state_dict(), strict=False)
            assert not unexpected and sorted(missing) == (
                ["b_layernorm.weight", "c_layernorm.weight", "dt_layernorm.weight"] if norm else [])
            y = mixer(x)
            if norm:
                assert (y - want).abs().max() > 1e-3
            else:
                torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


def test_mamba_without_dt_bc_norm_is_refused_by_the_hf_export():
    from jambatrain.hf_convert import to_hf_config

    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="mamba_dt_bc_norm"):
        to_hf_config(ModelConfig(mamba_dt_bc_norm=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_zoology_mamba_kernel_path_matches_reference_on_mqar():
    """The pure-Mamba arm as the GPU runs it (d 64: dt rank 4, d_state 16; CUDA scan and conv, the fused Triton
    RMSNorm on the 4-wide dt too) against the reference scan/conv with eager norms, fp32, on an MQAR batch with the
    labelled-only loss: the same loss and gradients (1e-3 relative per tensor)."""
    from jambatrain.models import ssm_ops

    if not (ssm_ops.kernels_available()["selective_scan"] and ssm_ops.kernels_available()["causal_conv1d"]):
        pytest.skip("mamba-ssm / causal-conv1d kernels not importable")
    torch.manual_seed(0)
    cfg = ModelConfig(name="zoology", vocab_size=8192, hidden_size=64, intermediate_size=0, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, num_experts=1, attn_layer_period=1000,
                      attn_layer_offset=999, tie_word_embeddings=True, compile_elementwise=False,
                      loss_labeled_only=True)
    fast = JambaLM(cfg).cuda()
    ref = JambaLM(ModelConfig(**{**cfg.__dict__, "mamba_impl": "reference", "fused_rms_norm": False})).cuda()
    ref.load_state_dict(fast.state_dict())
    inputs, labels = zoology_segment(8192, 64, 4, 32, seed=7)
    ids, lab = torch.from_numpy(inputs).cuda(), torch.from_numpy(labels).cuda()
    grads = []
    for m in (fast, ref):
        out = m(ids, labels=lab, return_logits=False)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.detach().double() for n, p in m.named_parameters()}))
    (lf, gf), (lr_, gr) = grads
    assert fast.layers[0].mixer.last_plan.scan == "mamba-ssm" and ref.layers[0].mixer.last_plan.scan == "reference"
    torch.testing.assert_close(lf, lr_, rtol=1e-4, atol=1e-5)
    bad = {n: ((gf[n] - gr[n]).norm() / gr[n].norm()).item() for n in gr if gr[n].norm() > 0}
    assert all(v < 1e-3 for v in bad.values()), bad


def test_build_model_keeps_tied_embeddings():
    """The trainer builds the model on the meta device and materialises it with to_empty, which gives every module a
    new parameter: model.tie_word_embeddings=true must still mean one parameter for the embedding and the LM head (it
    did not: the Zoology runs trained an untied head, 1,114,120 parameters instead of 589,832 at d 64)."""
    from types import SimpleNamespace

    from jambatrain.train import build_model

    for tie in (True, False):
        cfg = _tiny(tie_word_embeddings=tie)
        model = build_model(cfg, SimpleNamespace(device=torch.device("cpu")), {"zero_optimization": {"stage": 0}})
        assert (model.lm_head.weight is model.embed_tokens.weight) == tie
        assert model.num_params() == JambaLM(cfg).num_params()


def test_report_pools_the_runs_of_several_calls():
    """An arm whose lrs ran in different device calls: the table takes its best lr over all of them (it took the
    arm from the last call alone, dropping a better lr of an earlier call); a crashed run replaces nothing."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from mqar_zoology import merge

    def run(arm, lr, acc):
        return {"arm": arm, "lr": lr, "acc": acc, "d_model": 64, "epochs_done": 8.0}

    call1 = {"epochs": 8, "runs": [run("mamba_d64_N16", 0.01, 0.63), run("mamba_d64_N16", 0.00316, 0.43),
                                   run("hybrid8_1to3_d64", 0.00316, None)]}
    call2 = {"epochs": 8, "runs": [run("mamba_d64_N16", 0.0316, 0.33), run("hybrid8_1to3_d64", 0.00316, 0.99),
                                   run("mamba_d64_N16", 0.00316, None)]}
    arms = {a["arm"]: a for a in merge([call1, call2])["arms"]}
    assert arms["mamba_d64_N16"]["acc"] == 0.63 and arms["mamba_d64_N16"]["best_lr"] == 0.01
    assert arms["mamba_d64_N16"]["acc_by_lr"] == {"0.00316": 0.43, "0.01": 0.63, "0.0316": 0.33}
    assert arms["hybrid8_1to3_d64"]["acc"] == 0.99


def test_driver_leaves_the_rendezvous_port_to_each_trainer(tmp_path, monkeypatch):
    """The driver numbered MASTER_PORT 29601, 29602... per process, so two drivers on one machine (2-layer and
    8-layer grids side by side) started trainers on the same ports and 3 of 12 died with EADDRINUSE; each trainer
    now binds a free port itself (parallel/distributed.py)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from mqar_zoology import Procs

    monkeypatch.setenv("MASTER_PORT", "29500")
    show = [sys.executable, "-c", "import os; print(os.environ.get('MASTER_PORT'))"]
    jobs = [(f"job{i}", show, str(tmp_path / f"job{i}.log")) for i in range(2)]
    assert Procs(2, lambda msg: None).run(jobs) == {"job0": 0, "job1": 0}
    assert [open(tmp_path / f"job{i}.log").read().strip() for i in range(2)] == ["None", "None"]
