"""jambatrain <-> Hugging Face transformers Jamba: same logits both ways, export/import round trips, and the
DeepSpeed-checkpoint export CLI. HF runs its pure-PyTorch path (mamba-ssm / causal-conv1d are hidden while
its Jamba module is imported, and everything is on CPU in fp32)."""
from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import randomize, run_proc  # noqa: E402
from jambatrain.hf_convert import (  # noqa: E402
    config_mismatches, from_hf_config, from_hf_state_dict, shift_labels, to_hf_config, to_hf_state_dict,
)
from jambatrain.hf_io import load_hf_pretrained, save_hf_pretrained  # noqa: E402
from jambatrain.models import JambaLM, ModelConfig  # noqa: E402
from jambatrain.models.moe import route  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_hf_jamba_torch_only():
    """Import transformers' Jamba modelling with the optional CUDA kernel packages hidden, so its
    kernel-or-fallback wrappers bind the PyTorch reference functions (a CUDA box with mamba-ssm installed
    would otherwise run CUDA kernels on these CPU tensors)."""
    name = "transformers.models.jamba.modeling_jamba"
    if name in sys.modules:
        return sys.modules[name]
    saved = {k: sys.modules.get(k) for k in ("mamba_ssm", "causal_conv1d")}
    try:
        for k in saved:
            sys.modules[k] = None  # import -> ImportError
        return importlib.import_module(name)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


HFJ = _import_hf_jamba_torch_only()


def tiny(**kw) -> ModelConfig:
    base = dict(name="parity", vocab_size=67, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                expert_layer_period=2, expert_layer_offset=0, num_experts=4, num_experts_per_tok=2, mamba_d_state=8,
                mamba_d_conv=4, mamba_expand=2, mamba_impl="reference", moe_impl="native")
    base.update(kw)
    return ModelConfig(**base)


# (id, overrides): dense/MoE, attention 1:1, 1:3 and 1:7, expert periods/offsets, GQA 1/2/4, tied/untied,
# dt_rank auto/explicit, conv/proj bias on/off, top-1/2/3
CASES = [
    ("moe_1to1_gqa2", {}),
    ("dense_1to3_mha", dict(num_experts=1, num_experts_per_tok=1, attn_layer_period=4, attn_layer_offset=2,
                            num_hidden_layers=6, num_key_value_heads=4)),
    ("moe_1to7_gqa4_tied", dict(num_hidden_layers=9, attn_layer_period=8, attn_layer_offset=4, hidden_size=64,
                                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, num_experts=3,
                                num_experts_per_tok=1, expert_layer_period=3, expert_layer_offset=2)),
    ("moe_bias_dtrank", dict(mamba_proj_bias=True, mamba_conv_bias=False, mamba_dt_rank=5, num_experts=5,
                             num_experts_per_tok=3, expert_layer_period=1, expert_layer_offset=0, mamba_d_conv=3)),
    ("attn_first_mqa", dict(attn_layer_period=3, attn_layer_offset=0, num_hidden_layers=5, num_key_value_heads=1,
                            mamba_expand=1, mamba_d_state=4, tie_word_embeddings=True, num_experts=1)),
    ("pure_mamba_moe", dict(attn_layer_period=10, attn_layer_offset=9, num_hidden_layers=3, hidden_size=48,
                            num_attention_heads=6, num_key_value_heads=3, mamba_dt_rank=2, expert_layer_period=2,
                            expert_layer_offset=1)),
]


def hf_model(cfg: ModelConfig):
    m = transformers.JambaForCausalLM(to_hf_config(cfg))
    return m.eval()


def memory_format(hf) -> str:
    """transformers >= 5 fuses the experts into 3D tensors in memory; 4.x keeps one module per expert."""
    return "fused" if any(k.endswith("gate_up_proj") for k in hf.state_dict()) else "per_expert"


def assert_close_logits(a, b, tol=1e-4):
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max abs logit diff {diff:.3g} > {tol}"
    return diff


@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_jambatrain_to_hf_logits(case):
    cfg = tiny(**case)
    torch.manual_seed(0)
    ours = randomize(JambaLM(cfg), seed=1).eval()
    hf = hf_model(cfg)
    hf_sd = to_hf_state_dict(ours.state_dict(), cfg, expert_format=memory_format(hf))
    res = hf.load_state_dict(hf_sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ours(ids, labels=shift_labels(ids))
        b = hf(ids, labels=ids, use_cache=False)
    diff = assert_close_logits(a.logits, b.logits)
    assert abs(a.ce_loss.item() - b.loss.item()) <= 1e-5
    assert a.logits.abs().max() > 1.0  # non-trivial logits
    print(f"{cfg.layer_pattern()}: max |dlogit| = {diff:.2e}")
    # and back: HF state dict (fused experts) -> ours is the identity
    back = from_hf_state_dict(hf.state_dict(), cfg)
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("case", [CASES[0][1], CASES[2][1], CASES[3][1]], ids=[CASES[0][0], CASES[2][0], CASES[3][0]])
def test_hf_to_jambatrain_logits(case):
    cfg = tiny(**case)
    torch.manual_seed(3)
    hf = randomize(hf_model(cfg), seed=4)
    ours = JambaLM(from_hf_config(hf.config, mamba_impl="reference", moe_impl="native"))
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), ours.cfg), strict=True)
    ours.eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close_logits(ours(ids).logits, hf(ids, use_cache=False).logits)
        # HF's own initialisation (unit norms, zero dt bias) converts too
        hf0 = hf_model(cfg)
        ours.load_state_dict(from_hf_state_dict(hf0.state_dict(), ours.cfg), strict=True)
        assert_close_logits(ours(ids).logits, hf0(ids, use_cache=False).logits)


def test_eager_attention_too():
    cfg = tiny(num_key_value_heads=1)
    ours = randomize(JambaLM(cfg), seed=6).eval()
    hf = transformers.JambaForCausalLM._from_config(to_hf_config(cfg), attn_implementation="eager").eval()
    assert hf.config._attn_implementation == "eager"
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg, expert_format=memory_format(hf)))
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        assert_close_logits(ours(ids).logits, hf(ids, use_cache=False).logits)


def test_config_round_trip_and_rope_refused():
    for _, case in CASES:
        cfg = tiny(**case)
        back = from_hf_config(to_hf_config(cfg), name="parity", mamba_impl="reference", moe_impl="native")
        assert back == cfg, (cfg, back)
        assert config_mismatches(cfg, back) == []
        # the config.json dict form too
        assert from_hf_config(to_hf_config(cfg).to_dict(), name="parity", mamba_impl="reference",
                              moe_impl="native") == cfg
    with pytest.raises(ValueError, match="use_rope"):
        to_hf_config(tiny(use_rope=True))
    hc = transformers.JambaConfig()
    ignore = {"architectures": None, "pad_token_id": None}
    assert to_hf_config(from_hf_config(hc)).to_dict() | ignore == hc.to_dict() | ignore


def test_one_name_table_reads_both_ways():
    """Every weight name goes through hf_convert.NAME_TABLE (or the expert layouts) and comes back the same; a name
    outside the table is refused in both directions."""
    cfg = tiny(mamba_proj_bias=True)  # bias suffixes too
    sd = JambaLM(cfg).state_dict()
    for fmt in ("fused", "per_expert"):
        hf_sd = to_hf_state_dict(sd, cfg, expert_format=fmt)
        back = from_hf_state_dict(hf_sd, cfg)
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="unexpected jambatrain parameter"):
        to_hf_state_dict({"layers.0.mixer.bogus.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected Hugging Face Jamba weight"):
        from_hf_state_dict({"model.layers.0.feed_forward.experts.bogus": torch.zeros(1)}, cfg)


def test_per_expert_format_matches_fused():
    cfg = tiny()
    sd = randomize(JambaLM(cfg), seed=7).state_dict()
    fused, per = to_hf_state_dict(sd, cfg), to_hf_state_dict(sd, cfg, expert_format="per_expert")
    pre = "model.layers.0.feed_forward.experts."
    assert pre + "gate_up_proj" in fused and pre + "0.gate_proj.weight" in per
    f = cfg.intermediate_size
    for e in range(cfg.num_experts):
        assert torch.equal(fused[pre + "gate_up_proj"][e, :f], per[f"{pre}{e}.gate_proj.weight"])
        assert torch.equal(fused[pre + "gate_up_proj"][e, f:], per[f"{pre}{e}.up_proj.weight"])
        assert torch.equal(fused[pre + "down_proj"][e], per[f"{pre}{e}.down_proj.weight"])
    for k, v in from_hf_state_dict(per, cfg).items():
        assert torch.equal(v, sd[k]), k
    # a DeepSpeed/DDP "module." prefix is accepted
    assert set(to_hf_state_dict({"module." + k: v for k, v in sd.items()}, cfg)) == set(fused)


def test_save_load_generate(tmp_path):
    cfg = tiny(**CASES[2][1])  # tied, 1:7, top-1
    ours = randomize(JambaLM(cfg), seed=8).eval()
    out = tmp_path / "hf"
    written = save_hf_pretrained(ours, cfg, str(out), dtype="float32")
    assert "model.safetensors" in written and "config.json" in written
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "JambaForCausalLM"
    ids = torch.randint(3, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert_close_logits(ours(ids).logits, hf(ids, use_cache=False).logits)
        # greedy generation with HF's cache (recurrent Mamba step + conv state) vs our full re-forward
        gen = hf.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          eos_token_id=None, pad_token_id=0)
        seq = gen.sequences
        assert seq.shape == (1, 13)
        full = ours(seq).logits
        for i, step_logits in enumerate(gen.logits):
            assert_close_logits(step_logits, full[:, 6 + i], tol=1e-3)
        assert torch.equal(seq[:, 7:], full[:, 6:-1].argmax(-1))


def test_sharded_save_and_load_hf_pretrained(tmp_path):
    cfg = tiny(**CASES[3][1])
    src = randomize(JambaLM(cfg), seed=10).eval()
    out = tmp_path / "sharded"
    written = save_hf_pretrained(src, cfg, str(out), max_shard_size="30KB", dtype="float32")
    assert "model.safetensors.index.json" in written and sum(w.endswith(".safetensors") for w in written) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(to_hf_state_dict(src.state_dict(), cfg, expert_format="per_expert"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    dst = JambaLM(cfg).eval()
    load_hf_pretrained(dst, str(out))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert_close_logits(dst(ids).logits, hf(ids, use_cache=False).logits)
    # into a bf16 model: cast on load
    bf = JambaLM(cfg).to(torch.bfloat16)
    load_hf_pretrained(bf, str(out))
    assert torch.equal(bf.embed_tokens.weight, src.embed_tokens.weight.bfloat16())


def test_load_hf_pretrained_from_hf_save_pretrained(tmp_path):
    """A directory written by HF itself (per-expert on disk, fused in memory)."""
    cfg = tiny()
    hf = randomize(hf_model(cfg), seed=11)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = JambaLM(cfg).eval()
    load_hf_pretrained(ours, str(tmp_path / "hf"))
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        assert_close_logits(ours(ids).logits, hf(ids, use_cache=False).logits)


def test_load_hf_pretrained_mismatch_error(tmp_path):
    cfg = tiny()
    save_hf_pretrained(JambaLM(cfg), cfg, str(tmp_path / "m"))
    wrong = JambaLM(tiny(num_experts=8, mamba_d_state=4, num_key_value_heads=4))
    with pytest.raises(ValueError) as e:
        load_hf_pretrained(wrong, str(tmp_path / "m"))
    msg = str(e.value)
    for field in ("num_experts: model has 8, checkpoint has 4", "mamba_d_state", "num_key_value_heads"):
        assert field in msg, msg
    assert "intermediate_size" not in msg
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_pretrained(JambaLM(cfg), str(tmp_path))
    with pytest.raises(ValueError, match="use_rope"):
        load_hf_pretrained(JambaLM(tiny(use_rope=True)), str(tmp_path / "m"))


def test_hf_aux_loss_convention():
    """HF's load-balancing loss is top_k times jambatrain's (Megatron's) for the same router logits."""
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(12))
    for k in (1, 2, 3):
        ours = route(logits, k).aux_loss
        theirs = HFJ.load_balancing_loss_func((logits,), 6, k)
        torch.testing.assert_close(theirs, k * ours)


# ------------------------------------------------------------------------------------ export CLI
WORKER = textwrap.dedent(r'''
    import json, os, sys
    import torch
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401
    # skip the JIT build of DeepSpeed's CPU shared-memory allreduce op (~35 s of g++ on first use)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from jambatrain.models import JambaLM, ModelConfig

    run_dir, cfg_json, stage, tok = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cfg = ModelConfig(**json.loads(cfg_json))
    torch.manual_seed(0)
    model = JambaLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    rank = int(os.environ.get("RANK", 0))
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(2):
        ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=g)
        out = engine(ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
    from jambatrain import checkpoint  # the trainer's checkpoint: fp32 masters + moments, any layout
    state = checkpoint.TrainState(step=2, tokens=24, model_config=json.loads(cfg_json),
                                  parallel={"world_size": int(os.environ.get("WORLD_SIZE", 1)), "zero_stage": stage})
    checkpoint.save(engine, model, run_dir, state, rank, keep=1)
    if rank == 0:
        engine.module.eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            logits = engine.module(ids).logits
        torch.save({"ids": ids, "logits": logits}, os.path.join(run_dir, "ref.pt"))
        run_cfg = {"name": "t", "data": {"dir": os.path.dirname(tok), "seq_len": 12}}
        os.makedirs(os.path.join(run_dir, ".hydra"), exist_ok=True)
        with open(os.path.join(run_dir, ".hydra", "config.yaml"), "w") as f:  # JSON is YAML
            json.dump(run_cfg, f)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**kw):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(kw)
    return env


def _train_tokenizer(path: str) -> str:
    import io

    spm = pytest.importorskip("sentencepiece")
    text = ["def foo(x):\n    return x + 1\n", "Hello world!  Two  spaces.", "import os\nprint(os.getcwd())"] * 40
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=320, model_type="bpe",
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=False,
                                   allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


@pytest.mark.slow
@pytest.mark.parametrize("launch,stage", [("single", 2), ("single", 0), ("torchrun2", 2)])
def test_export_cli_from_a_jambatrain_checkpoint(tmp_path, launch, stage):
    pytest.importorskip("deepspeed")
    pytest.importorskip("omegaconf")
    cfg = tiny(**CASES[0][1], vocab_size=320,  # = the tokenizer's
               tie_word_embeddings=launch == "torchrun2")  # tied: DeepSpeed's shared_params path
    cfg_json = json.dumps({k: v for k, v in cfg.__dict__.items()})
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "data").mkdir()
    tok = _train_tokenizer(str(tmp_path / "data" / "tokenizer.model"))  # found through data.dir
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = [str(worker), str(run), cfg_json, str(stage), tok]
    port = str(_free_port())
    if launch == "single":
        cmd = [sys.executable, *args]
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", port, *args]
        env = _env()
    r = run_proc(cmd, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "shm_comm" not in r.stdout + r.stderr or "built successfully" not in r.stdout + r.stderr
    ckpt = run / "checkpoints" / "step_00000002"
    if launch == "torchrun2":
        assert len(list(ckpt.glob("params_r*.pt"))) == 2  # written by 2 ZeRO ranks

    out = tmp_path / "hf"
    src = run if launch != "single" or stage else ckpt  # a run dir, or one checkpoint dir
    r = subprocess.run([sys.executable, "-m", "jambatrain.export_hf", str(src), str(out), "--dtype", "float32",
                        "--max-shard-size", "100KB"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "tokenizer.model" in files, files

    ref = torch.load(run / "ref.pt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        diff = assert_close_logits(hf(ref["ids"], use_cache=False).logits, ref["logits"])
    print(f"{launch} ZeRO-{stage}: max |dlogit| = {diff:.2e}")
    tok_hf = transformers.AutoTokenizer.from_pretrained(str(out))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok)
    text = "def foo(x):\n    return  os.getcwd()"
    assert tok_hf(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert hf.config.eos_token_id == 2 and hf.config.bos_token_id == 1 and hf.config.pad_token_id is None


@pytest.mark.parametrize("ep_size,ep_rank", [(2, 0), (2, 1), (4, 3)])
def test_load_hf_pretrained_into_an_expert_parallel_rank(tmp_path, ep_size, ep_rank):
    """model.init_from under expert parallelism: each rank takes its own experts of the HF checkpoint (fused or
    per-expert layout), everything else whole."""
    from jambatrain.parallel import expert_parallel

    cfg = tiny(num_experts=4, num_experts_per_tok=2)
    src = randomize(JambaLM(cfg), seed=11).eval()
    E = cfg.num_experts
    out = str(tmp_path / "hf")
    save_hf_pretrained(src, cfg, out, dtype="float32")
    dst = JambaLM(cfg)
    info = expert_parallel.ExpertParallel(size=ep_size, rank=ep_rank, group=None, edp_group=None, edp_rank=0,
                                          group_name=f"ep_size_{ep_size}")
    expert_parallel.apply(dst, info)
    load_hf_pretrained(dst, out)
    lo, hi = ep_rank * E // ep_size, (ep_rank + 1) * E // ep_size
    mine = dict(dst.named_parameters())
    for k, v in src.named_parameters():
        if k.endswith(("w_gate", "w_up", "w_down")):
            assert torch.equal(mine[k], v[lo:hi]), k
        else:
            assert torch.equal(mine[k], v), k
