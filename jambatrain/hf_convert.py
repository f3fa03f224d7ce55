"""Conversion between jambatrain's ``JambaLM`` and Hugging Face transformers' ``JambaForCausalLM``.

Config: ``ModelConfig`` fields are named after ``JambaConfig``'s, so the mapping is 1:1 except
  * ``mamba_dt_rank``: 0 here means "auto" (= ceil(hidden/16)); HF stores the resolved int.
  * ``use_rope``: HF Jamba has no positional embedding, so a RoPE model cannot be exported.
  * jambatrain-only fields (name, router_z_loss_coef, rope_theta, *_impl, activation_checkpointing, loss_chunk_tokens,
    the kernel switches, init_from) have no HF counterpart; ``from_hf_config`` takes them from ``ModelConfig``
    defaults or keyword overrides.
  * the load-balancing loss: jambatrain's aux loss is Megatron's (1.0 at uniform routing), HF's
    ``load_balancing_loss_func`` is ``num_experts_per_tok`` times larger; ``router_aux_loss_coef`` is
    copied as is, so the same coefficient weighs the balance term k times less here than in HF training.

Weights: ``NAME_TABLE`` below is the one jambatrain <-> HF name table, read in both directions
(``to_hf_state_dict``, ``from_hf_state_dict``, ``iter_from_hf``); the stacked MoE experts have two HF layouts,
described next to ``EXPERT_PER_EXPERT`` / ``EXPERT_FUSED``.

Writing and reading HF model directories is in ``hf_io``. transformers is imported inside the functions that
need it: it is an optional dependency.
"""
from __future__ import annotations

import re
from dataclasses import fields
from typing import Iterator

import torch

from .models.config import ModelConfig, hf_fields, weight_fields

# ModelConfig fields that HF JambaConfig has under the same name and meaning: the ones marked ``arch(hf=True)`` in
# models/config.py (a new field declares it there; nothing is listed here)
_SHARED_FIELDS = hf_fields()

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
    if cfg.intermediate_size == 0 or cfg.short_conv_layer_period:
        raise ValueError("model.intermediate_size=0 (no FFN) and model.short_conv_layer_period (short-conv mixers) have "
                         "no Hugging Face Jamba equivalent: this model cannot be exported")
    if not cfg.mamba_dt_bc_norm:
        raise ValueError("model.mamba_dt_bc_norm=false (Mamba without Jamba's dt/B/C norms) has no Hugging Face Jamba "
                         "equivalent (JambaMambaMixer always norms them): this model cannot be exported")
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


def shift_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """HF causal LMs take ``labels=input_ids`` and shift inside; jambatrain takes labels already shifted (its loader
    packs seq_len + 1 tokens). labels[:, t] = input_ids[:, t + 1]; the last position is ignored (-100)."""
    return torch.cat([input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), -100)], dim=1)


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
    """Fields HF weights must agree on (``weight_fields``: shapes or the function computed; the expert period/offset
    only when MoE is on) on which two configs disagree."""
    out = []
    for k in weight_fields(moe=cfg.num_experts > 1 or other.num_experts > 1):
        k = "dt_rank" if k == "mamba_dt_rank" else k  # compared resolved: 0 means "auto"
        a, b = getattr(cfg, k), getattr(other, k)
        if a != b:
            out.append(f"{k}: model has {a!r}, checkpoint has {b!r}")
    return out


# ------------------------------------------------------------------------------------------ weights
# The one name table, read in both directions (jambatrain name, HF name, the parameter names ``{w}`` may be, each
# with any ``.weight``/``.bias`` suffix); ``{i}`` is a layer index.
_MAMBA_PARAMS = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", "dt_layernorm",
                 "b_layernorm", "c_layernorm")
_ATTN_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj")
NAME_TABLE = (
    ("embed_tokens.weight", "model.embed_tokens.weight", ()),
    ("final_layernorm.weight", "model.final_layernorm.weight", ()),
    ("lm_head.weight", "lm_head.weight", ()),  # left out of saved files when tied
    ("layers.{i}.input_layernorm.{w}", "model.layers.{i}.input_layernorm.{w}", ("weight",)),
    ("layers.{i}.pre_ff_layernorm.{w}", "model.layers.{i}.pre_ff_layernorm.{w}", ("weight",)),
    ("layers.{i}.mixer.{w}", "model.layers.{i}.self_attn.{w}", _ATTN_PARAMS),
    ("layers.{i}.mixer.{w}", "model.layers.{i}.mamba.{w}", _MAMBA_PARAMS),
    ("layers.{i}.ffn.{w}", "model.layers.{i}.feed_forward.{w}", ("gate_proj", "up_proj", "down_proj", "router")),
)
# MoE experts: stacked (E, ffn, hidden) tensors ``layers.{i}.ffn.{w_gate,w_up,w_down}`` here (y = act @ w_down[e]),
# ``model.layers.{i}.feed_forward.experts.*`` in HF in one of two layouts:
#   per_expert (the on-disk format of ai21labs/Jamba-v0.1 and of HF ``save_pretrained``):
#       experts.{e}.{name}.weight = ours[e], transposed where marked
#   fused (the in-memory JambaForCausalLM of transformers >= 5):
#       experts.{name} = cat(ours..., dim=1), then transpose(1, 2) where marked
EXPERT_PREFIX = ("layers.{i}.ffn.", "model.layers.{i}.feed_forward.experts.")  # (ours, HF)
EXPERT_PER_EXPERT = {"w_gate": ("gate_proj", False), "w_up": ("up_proj", False), "w_down": ("down_proj", True)}
EXPERT_FUSED = {"gate_up_proj": (("w_gate", "w_up"), False), "down_proj": (("w_down",), True)}


def _layer_rx(template: str) -> str:
    """``template`` as a regex, its ``{i}`` a layer index group."""
    return re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")


def _pattern(template: str, names) -> re.Pattern:
    rx = _layer_rx(template)
    rx = rx.replace(r"\{w\}", "(?P<w>(?:" + "|".join(map(re.escape, names)) + r")(?:\.\w+)?)")
    return re.compile(rx + "$")


_RULES = [(_pattern(ours, names), _pattern(hf, names), ours, hf) for ours, hf, names in NAME_TABLE]
_OURS_EXPERT = re.compile(_layer_rx(EXPERT_PREFIX[0]) + "(" + "|".join(EXPERT_PER_EXPERT) + ")$")
_HF_EXPERT = re.compile(_layer_rx(EXPERT_PREFIX[1]) + r"(?:(\d+)\.(\w+)\.weight|(\w+))$")
_HF_NAME = {hf: ours for ours, (hf, _) in EXPERT_PER_EXPERT.items()}


def _rename(key: str, to_hf: bool) -> str | None:
    """``key`` through NAME_TABLE (jambatrain -> HF when ``to_hf``, else back); None when no row matches."""
    for ours_rx, hf_rx, ours, hf in _RULES:
        m = (ours_rx if to_hf else hf_rx).match(key)
        if m:
            return (hf if to_hf else ours).format(**m.groupdict())
    return None


def _strip_prefix(sd: dict) -> dict:
    """Drop a DDP/DeepSpeed ``module.`` (or torch.compile ``_orig_mod.``) prefix."""
    for p in ("module.", "_orig_mod."):
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


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
    experts: dict[str, dict[str, torch.Tensor]] = {}  # layer -> our expert tensors
    for k, t in sd.items():
        hk = _rename(k, to_hf=True)
        if hk is not None:
            out[hk] = t
            continue
        m = _OURS_EXPERT.match(k)
        if not m:
            raise KeyError(f"unexpected jambatrain parameter {k!r}")
        experts.setdefault(m.group(1), {})[m.group(2)] = t
    for i, ours in experts.items():
        pre = EXPERT_PREFIX[1].format(i=i)
        if expert_format == "per_expert":
            for w, t in ours.items():
                name, transposed = EXPERT_PER_EXPERT[w]
                for e in range(t.shape[0]):
                    out[f"{pre}{e}.{name}.weight"] = t[e].t() if transposed else t[e]
            continue
        for name, (parts, transposed) in EXPERT_FUSED.items():
            missing = [w for w in parts if w not in ours]
            if missing:
                ffn = EXPERT_PREFIX[0].format(i=i)
                raise KeyError(f"{ffn}{missing[0]} missing next to {ffn}{sorted(ours)[0]}")
            t = ours[parts[0]] if len(parts) == 1 else torch.cat([ours[w] for w in parts], dim=1)
            out[pre + name] = t.transpose(1, 2) if transposed else t
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


def iter_from_hf(key: str, t: torch.Tensor) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """One HF tensor -> (jambatrain name, expert index or None for the whole tensor, tensor), by NAME_TABLE and
    the expert layouts."""
    name = _rename(key, to_hf=False)
    if name is not None:
        yield name, None, t
        return
    m = _HF_EXPERT.match(key)
    if not m:
        raise KeyError(f"unexpected Hugging Face Jamba weight {key!r}")
    i, e, per, fused = m.groups()
    pre = EXPERT_PREFIX[0].format(i=i)
    if per is not None and per in _HF_NAME:
        w = _HF_NAME[per]
        yield pre + w, int(e), (t.t() if EXPERT_PER_EXPERT[w][1] else t)
    elif fused in EXPERT_FUSED:
        parts, transposed = EXPERT_FUSED[fused]
        t = t.transpose(1, 2) if transposed else t
        for w, chunk in zip(parts, t.chunk(len(parts), dim=1)):
            yield pre + w, None, chunk
    else:
        raise KeyError(f"unexpected Hugging Face Jamba weight {key!r}")


def from_hf_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """HF Jamba state dict (fused or per-expert experts, as in memory or on disk) -> jambatrain state dict.
    A missing ``lm_head.weight`` of a tied model is filled with the embedding."""
    out: dict = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for k, t in sd.items():
        for name, e, v in iter_from_hf(k, t):
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
