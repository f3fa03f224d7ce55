"""Conversion between jambatrain's ``JambaLM`` and Hugging Face transformers' ``JambaForCausalLM``.

Config: ``ModelConfig`` fields are named after ``JambaConfig``'s, so the mapping is 1:1 except
  * ``mamba_dt_rank``: 0 here means "auto" (= ceil(hidden/16)); HF stores the resolved int.
  * ``use_rope``: HF Jamba has no positional embedding, so a RoPE model cannot be exported.
  * jambatrain-only fields (name, router_z_loss_coef, rope_theta, *_impl, activation_checkpointing,
    init_from) have no HF counterpart; ``from_hf_config`` takes them from ``ModelConfig`` defaults or
    keyword overrides.
  * the load-balancing loss: jambatrain's aux loss is Megatron's (1.0 at uniform routing), HF's
    ``load_balancing_loss_func`` is ``num_experts_per_tok`` times larger; ``router_aux_loss_coef`` is
    copied as is, so the same coefficient weighs the balance term k times less here than in HF training.

Weights (jambatrain name -> HF name, ``model.`` prefix on everything but ``lm_head``):
  embed_tokens.weight                      -> model.embed_tokens.weight
  layers.{i}.input_layernorm.weight        -> model.layers.{i}.input_layernorm.weight
  layers.{i}.pre_ff_layernorm.weight       -> model.layers.{i}.pre_ff_layernorm.weight
  layers.{i}.mixer.{q,k,v,o}_proj.weight   -> model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
  layers.{i}.mixer.{in_proj,conv1d,x_proj,dt_proj,A_log,D,out_proj,dt/b/c_layernorm}
                                           -> model.layers.{i}.mamba.{same}
  layers.{i}.ffn.{gate,up,down}_proj.weight -> model.layers.{i}.feed_forward.{gate,up,down}_proj.weight
  layers.{i}.ffn.router.weight             -> model.layers.{i}.feed_forward.router.weight
  layers.{i}.ffn.w_gate / w_up (E, f, h), w_down (E, f, h) with y = act @ w_down[e]:
      fused (in-memory JambaForCausalLM of transformers >= 5):
          feed_forward.experts.gate_up_proj (E, 2f, h) = cat(w_gate, w_up, dim=1)
          feed_forward.experts.down_proj    (E, h, f)  = w_down.transpose(1, 2)
      per_expert (the on-disk format of ai21labs/Jamba-v0.1 and of HF ``save_pretrained``):
          feed_forward.experts.{e}.gate_proj.weight (f, h) = w_gate[e]
          feed_forward.experts.{e}.up_proj.weight   (f, h) = w_up[e]
          feed_forward.experts.{e}.down_proj.weight (h, f) = w_down[e].T
  final_layernorm.weight                   -> model.final_layernorm.weight
  lm_head.weight                           -> lm_head.weight (left out of saved files when tied)

transformers is imported inside the functions that need it: it is an optional dependency.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import fields
from typing import Iterator

import torch

from .models.config import ModelConfig

# ModelConfig fields that HF JambaConfig has under the same name and meaning.
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "attn_layer_period", "attn_layer_offset", "expert_layer_period",
    "expert_layer_offset", "num_experts", "num_experts_per_tok", "router_aux_loss_coef", "mamba_d_state",
    "mamba_d_conv", "mamba_expand", "mamba_conv_bias", "mamba_proj_bias", "rms_norm_eps",
    "tie_word_embeddings", "initializer_range", "max_position_embeddings",
)
# Fields that change the weights' shapes or the function the weights compute: they must agree for
# HF weights to be loaded into a model.
_ARCH_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "attn_layer_period", "attn_layer_offset", "num_experts", "num_experts_per_tok",
    "mamba_d_state", "mamba_d_conv", "mamba_expand", "dt_rank", "mamba_conv_bias", "mamba_proj_bias",
    "rms_norm_eps", "tie_word_embeddings", "use_rope",
)

_MAMBA_PARAMS = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", "dt_layernorm",
                 "b_layernorm", "c_layernorm")
_ATTN_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------------------------- config
def to_hf_config(cfg: ModelConfig, **hf_kwargs):
    """A ``transformers.JambaConfig`` for ``cfg``; ``hf_kwargs`` set HF-only fields (token ids, dtype,
    use_cache...). Token ids default to jambatrain's tokenizer: bos 1, eos 2, no pad."""
    from transformers import JambaConfig

    if cfg.use_rope:
        raise ValueError("model.use_rope=true has no Hugging Face Jamba equivalent (HF Jamba attention has no "
                         "positional embedding): this model cannot be exported")
    problems = cfg.problems()
    if problems:
        raise ValueError("invalid model config:\n  " + "\n  ".join(problems))
    kw = {k: getattr(cfg, k) for k in _SHARED_FIELDS}
    for k in ("router_aux_loss_coef", "rms_norm_eps", "initializer_range"):  # JambaConfig is type-strict
        kw[k] = float(kw[k])
    kw["mamba_dt_rank"] = cfg.dt_rank
    kw["hidden_act"] = "silu"
    kw["architectures"] = ["JambaForCausalLM"]
    # jambatrain's SentencePiece convention (unk 0, bos 1, eos 2, no pad); HF's default pad 0 would make
    # token 0 a padding_idx (no gradient) in HF fine-tuning
    kw.update(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    kw.update(hf_kwargs)
    return JambaConfig(**kw)


def _hf_get(hf_cfg, key, default=None):
    if isinstance(hf_cfg, dict):
        if key == "num_experts" and key not in hf_cfg:
            key = "num_local_experts"
        return hf_cfg.get(key, default)
    return getattr(hf_cfg, key, default)


def from_hf_config(hf_cfg, **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a ``JambaConfig`` (or its config.json dict). ``overrides`` set jambatrain-only
    fields (name, mamba_impl, ...) or replace any converted value."""
    model_type = _hf_get(hf_cfg, "model_type", "jamba")
    if model_type != "jamba":
        raise ValueError(f"not a Jamba config: model_type={model_type!r}")
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    kw = {}
    for k in _SHARED_FIELDS:
        v = _hf_get(hf_cfg, k, None)
        kw[k] = defaults[k] if v is None else v
    hidden = kw["hidden_size"]
    dt_rank = _hf_get(hf_cfg, "mamba_dt_rank", "auto")
    dt_rank = 0 if dt_rank in (None, "auto") else int(dt_rank)
    # store "auto" as 0 when it resolves to the same rank, so the config round trips to itself
    kw["mamba_dt_rank"] = 0 if dt_rank == -(-hidden // 16) else dt_rank
    if kw["num_key_value_heads"] is None:
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    act = _hf_get(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r}: jambatrain's FFNs are SwiGLU (silu) only")
    kw["use_rope"] = False
    kw.update(overrides)
    return ModelConfig(**kw)


def config_mismatches(cfg: ModelConfig, other: ModelConfig) -> list[str]:
    """Architecture fields on which two configs disagree (the expert period/offset only when MoE is on)."""
    out = []
    keys = list(_ARCH_FIELDS)
    if cfg.num_experts > 1 or other.num_experts > 1:
        keys += ["expert_layer_period", "expert_layer_offset"]
    for k in keys:
        a, b = getattr(cfg, k), getattr(other, k)
        if a != b:
            out.append(f"{k}: model has {a!r}, checkpoint has {b!r}")
    return out


# ------------------------------------------------------------------------------------------ weights
_OURS = re.compile(r"^layers\.(\d+)\.(input_layernorm|pre_ff_layernorm|mixer|ffn)\.(.+)$")
_HF = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|pre_ff_layernorm|self_attn|mamba|feed_forward)\.(.+)$")
_HF_EXPERT = re.compile(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _strip_prefix(sd: dict) -> dict:
    """Drop a DDP/DeepSpeed ``module.`` (or torch.compile ``_orig_mod.``) prefix."""
    for p in ("module.", "_orig_mod."):
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def _iter_to_hf(key: str, t: torch.Tensor, expert_format: str) -> Iterator[tuple[str, torch.Tensor]]:
    if key in ("embed_tokens.weight", "final_layernorm.weight"):
        yield "model." + key, t
        return
    if key == "lm_head.weight":
        yield key, t
        return
    m = _OURS.match(key)
    if not m:
        raise KeyError(f"unexpected jambatrain parameter {key!r}")
    i, part, rest = m.groups()
    pre = f"model.layers.{i}."
    if part in ("input_layernorm", "pre_ff_layernorm"):
        yield pre + part + "." + rest, t
    elif part == "mixer":
        base = rest.split(".")[0]
        if base in _ATTN_PARAMS:
            yield pre + "self_attn." + rest, t
        elif base in _MAMBA_PARAMS:
            yield pre + "mamba." + rest, t
        else:
            raise KeyError(f"unexpected mixer parameter {key!r}")
    else:  # ffn
        ff = pre + "feed_forward."
        if rest in ("gate_proj.weight", "up_proj.weight", "down_proj.weight", "router.weight"):
            yield ff + rest, t
        elif rest in ("w_gate", "w_up", "w_down"):
            if expert_format == "per_expert":
                name = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[rest]
                for e in range(t.shape[0]):
                    w = t[e].t() if rest == "w_down" else t[e]
                    yield f"{ff}experts.{e}.{name}.weight", w
            elif rest == "w_down":
                yield ff + "experts.down_proj", t.transpose(1, 2)
            # w_gate and w_up are fused together by to_hf_state_dict
        else:
            raise KeyError(f"unexpected ffn parameter {key!r}")


def to_hf_state_dict(sd: dict, cfg: ModelConfig | None = None, expert_format: str = "fused") -> dict:
    """jambatrain state dict -> HF ``JambaForCausalLM`` state dict.

    ``expert_format``: "fused" gives the in-memory layout of transformers >= 5 (``load_state_dict``-able into
    ``JambaForCausalLM``); "per_expert" the on-disk layout of ai21labs/Jamba-v0.1 (what ``from_pretrained``
    of every transformers version reads). Tensors are views where possible (no copies).
    A tied model's ``lm_head.weight`` is kept (the same tensor as the embedding)."""
    if expert_format not in ("fused", "per_expert"):
        raise ValueError(f"expert_format={expert_format!r}: choose fused or per_expert")
    sd = _strip_prefix(dict(sd))
    out = {}
    for k, t in sd.items():
        for hk, ht in _iter_to_hf(k, t, expert_format):
            out[hk] = ht
    if expert_format == "fused":
        for k in sd:
            m = _OURS.match(k)
            if m and m.group(2) == "ffn" and m.group(3) == "w_gate":
                pre = k[: -len("w_gate")]
                up = sd.get(pre + "w_up")
                if up is None:
                    raise KeyError(f"{pre}w_up missing next to {k}")
                out[f"model.layers.{m.group(1)}.feed_forward.experts.gate_up_proj"] = torch.cat([sd[k], up], dim=1)
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out and (cfg is None or cfg.tie_word_embeddings):
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    if cfg is not None:
        _check_layer_kinds(out, cfg)
    return out


def _check_layer_kinds(hf_sd: dict, cfg: ModelConfig):
    for i in range(cfg.num_hidden_layers):
        want = "self_attn" if cfg.is_attention_layer(i) else "mamba"
        if not any(k.startswith(f"model.layers.{i}.{want}.") for k in hf_sd):
            raise ValueError(f"layer {i} should be {'attention' if want == 'self_attn' else 'Mamba'} by the config "
                             f"(pattern {cfg.layer_pattern()!r}) but the weights have no {want} parameters")


def _iter_from_hf(key: str, t: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """One HF tensor -> (jambatrain name, expert index or None for the whole tensor, tensor)."""
    if key in ("model.embed_tokens.weight", "model.final_layernorm.weight"):
        yield key[len("model."):], None, t
        return
    if key == "lm_head.weight":
        yield key, None, t
        return
    m = _HF.match(key)
    if not m:
        raise KeyError(f"unexpected Hugging Face Jamba weight {key!r}")
    i, part, rest = m.groups()
    pre = f"layers.{i}."
    if part in ("input_layernorm", "pre_ff_layernorm"):
        yield pre + part + "." + rest, None, t
    elif part in ("self_attn", "mamba"):
        yield pre + "mixer." + rest, None, t
    elif rest in ("gate_proj.weight", "up_proj.weight", "down_proj.weight", "router.weight"):
        yield pre + "ffn." + rest, None, t
    elif rest == "experts.gate_up_proj":
        f = t.shape[1] // 2
        yield pre + "ffn.w_gate", None, t[:, :f]
        yield pre + "ffn.w_up", None, t[:, f:]
    elif rest == "experts.down_proj":
        yield pre + "ffn.w_down", None, t.transpose(1, 2)
    else:
        me = _HF_EXPERT.match(rest)
        if not me:
            raise KeyError(f"unexpected Hugging Face Jamba weight {key!r}")
        e, name = int(me.group(1)), me.group(2)
        ours = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}[name]
        yield pre + "ffn." + ours, e, (t.t() if name == "down_proj" else t)


def from_hf_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """HF Jamba state dict (fused or per-expert experts, as in memory or on disk) -> jambatrain state dict.
    A missing ``lm_head.weight`` of a tied model is filled with the embedding."""
    out: dict = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for k, t in sd.items():
        for name, e, v in _iter_from_hf(k, t, cfg):
            if e is None:
                out[name] = v
            else:
                experts.setdefault(name, {})[e] = v
    for name, per in experts.items():
        n = cfg.num_experts
        if sorted(per) != list(range(n)):
            raise KeyError(f"{name}: expected experts 0..{n - 1} in the checkpoint, got {sorted(per)}")
        out[name] = torch.stack([per[e] for e in range(n)])
    if "lm_head.weight" not in out and cfg.tie_word_embeddings and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


# -------------------------------------------------------------------------------------- file I/O
def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"bad size {size!r}: use e.g. 5GB, 500MB or a byte count")
    num, unit = float(m.group(1)), (m.group(2) or "B")
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(num * mult)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def save_hf_pretrained(model_or_state_dict, cfg: ModelConfig, out_dir: str, tokenizer_path: str | None = None,
                       max_shard_size="5GB", dtype: str | torch.dtype | None = None) -> list[str]:
    """Write an HF Jamba checkpoint that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

    config.json + generation_config.json + model.safetensors (or model-0000i-of-0000n.safetensors and
    model.safetensors.index.json when larger than ``max_shard_size``), experts in the per-expert layout of
    ai21labs/Jamba-v0.1. ``dtype``: cast floating weights (default: keep). ``tokenizer_path``: a SentencePiece
    .model file copied to tokenizer.model, with the files ``AutoTokenizer`` needs. Returns the files written.
    """
    from safetensors.torch import save_file

    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    hf_sd = to_hf_state_dict(sd, cfg, expert_format="per_expert")
    if cfg.tie_word_embeddings:
        hf_sd.pop("lm_head.weight", None)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # stale shards of an earlier export would shadow the index
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f):
            os.remove(os.path.join(out_dir, f))

    def tensor_dtype(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = total = 0
    for k, t in hf_sd.items():
        n = t.numel() * tensor_dtype(t).itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
        total += n
    written = []
    weight_map = {}
    for s, keys in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        # clone: per-expert slices are views of one storage, which safetensors refuses to write
        part = {k: hf_sd[k].detach().to("cpu", tensor_dtype(hf_sd[k]), copy=True).contiguous() for k in keys}
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        os.chmod(os.path.join(out_dir, fname), 0o666 & ~_umask())  # safetensors creates files 0600
        del part
        written.append(fname)
        weight_map.update(dict.fromkeys(keys, fname))
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append("model.safetensors.index.json")

    token_ids = {}
    if tokenizer_path is not None:
        token_ids = _special_token_ids(tokenizer_path)
    save_dtype = dtype or next((t.dtype for t in hf_sd.values() if t.is_floating_point()), torch.float32)
    hf_cfg = to_hf_config(cfg, dtype=str(save_dtype).replace("torch.", ""), **token_ids)
    hf_cfg.save_pretrained(out_dir)
    written.append("config.json")
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(hf_cfg).save_pretrained(out_dir)
        written.append("generation_config.json")
    except Exception:  # noqa: BLE001 - optional nicety
        pass
    if tokenizer_path is not None:
        written += save_hf_tokenizer(tokenizer_path, out_dir)
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _special_token_ids(tokenizer_path: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def save_hf_tokenizer(tokenizer_path: str, out_dir: str) -> list[str]:
    """Copy a SentencePiece model to ``out_dir/tokenizer.model`` and write tokenizer_config.json +
    special_tokens_map.json so that ``AutoTokenizer.from_pretrained(out_dir)`` loads it (as a
    ``LlamaTokenizer``, what ai21labs/Jamba-v0.1 ships). No BOS/EOS is added by default: jambatrain
    trains on raw ids with an EOS after each document."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)

    def piece(i):
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
               "pad_token": piece(sp.pad_id())}
    special = {k: v for k, v in special.items() if v is not None}
    tok_cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
               "add_prefix_space": False, "legacy": False, "clean_up_tokenization_spaces": False,
               "model_max_length": 1 << 30, **special}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]


def _read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: model.init_from must be a Hugging Face Jamba directory "
                                "(config.json + model*.safetensors)")
    with open(cfg_path) as f:
        return json.load(f)


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path} "
                            "(only safetensors checkpoints are read)")


def load_hf_state_dict(path: str, cfg: ModelConfig) -> dict:
    """All weights of an HF Jamba directory as a jambatrain state dict (fp as stored, on CPU)."""
    from safetensors.torch import load_file

    hf_sd = {}
    for f in _weight_files(path):
        hf_sd.update(load_file(f))
    return from_hf_state_dict(hf_sd, cfg)


@torch.no_grad()
def load_hf_pretrained(model, path: str, strict: bool = True) -> None:
    """Initialise ``model`` (a ``JambaLM``) from an HF Jamba directory: config.json + model.safetensors or a
    sharded model-*.safetensors + model.safetensors.index.json (fused or per-expert expert layout).

    Raises ValueError naming every architecture field where config.json disagrees with ``model.cfg``.
    Weights are read one shard at a time and copied (cast to each parameter's dtype and device) into the
    existing parameters, so peak extra memory is one shard. Call it before wrapping the model in
    DeepSpeed/ZeRO-3 (the parameters must be whole)."""
    from safetensors import safe_open

    cfg = model.cfg
    hf_cfg = _read_hf_config(path)
    theirs = from_hf_config(hf_cfg)
    bad = config_mismatches(cfg, theirs)
    if bad:
        raise ValueError(f"model.init_from={path}: its config.json does not match the model config:\n  "
                         + "\n  ".join(bad) + "\nset these model.* fields to the checkpoint's values")
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    filled: dict[str, set] = {}
    unexpected = []
    for f in _weight_files(path):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                for name, e, v in _iter_from_hf(k, t, cfg):
                    p = params.get(name)
                    if p is None:
                        unexpected.append(k)
                        continue
                    dst = p if e is None else p[e]
                    if dst.shape != v.shape:
                        raise ValueError(f"{k} -> {name}{'' if e is None else f'[{e}]'}: checkpoint shape "
                                         f"{tuple(v.shape)} != model shape {tuple(dst.shape)}")
                    dst.copy_(v)
                    filled.setdefault(name, set()).add(e)
    missing = []
    for name, p in params.items():
        got = filled.get(name, set())
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the same tensor as the embedding
        if None in got:
            continue
        if got and len(got) == p.shape[0]:
            continue
        missing.append(name if not got else f"{name} (experts {sorted(set(range(p.shape[0])) - got)})")
    if strict and (missing or unexpected):
        raise ValueError(f"model.init_from={path}: weights do not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
