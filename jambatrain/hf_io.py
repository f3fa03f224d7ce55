"""Hugging Face Jamba directories: write one (config.json, safetensors shards, tokenizer) from a jambatrain
model or state dict, and load one into a ``JambaLM``. The name mapping lives in ``hf_convert``."""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

from .hf_convert import (config_mismatches, from_hf_config, from_hf_state_dict, iter_from_hf, to_hf_config,
                         to_hf_state_dict)
from .models.config import ModelConfig


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def save_hf_pretrained(model_or_state_dict, cfg: ModelConfig, out_dir: str, tokenizer_path: str | None = None,
                       max_shard_size="5GB", dtype: str | torch.dtype | None = None) -> list[str]:
    """Write an HF Jamba checkpoint that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

    config.json + generation_config.json + model.safetensors (or model-0000i-of-0000n.safetensors and
    model.safetensors.index.json when larger than ``max_shard_size``), experts in the per-expert layout of
    ai21labs/Jamba-v0.1. ``dtype``: cast floating weights (default: keep). ``tokenizer_path``: a SentencePiece
    .model file copied to tokenizer.model, with the files ``AutoTokenizer`` needs. Returns the files written.
    Sharding is ``huggingface_hub.save_torch_state_dict``'s; the weights are converted to the export dtype on the CPU
    first (host memory: the state dict plus that copy where the dtype or device changes).
    """
    save_torch_state_dict = _hub_saver()
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    hf_sd = to_hf_state_dict(sd, cfg, expert_format="per_expert")
    if cfg.tie_word_embeddings:
        hf_sd.pop("lm_head.weight", None)
    os.makedirs(out_dir, exist_ok=True)
    hf_sd = {k: _for_saving(t, dtype) for k, t in hf_sd.items()}
    # sharding, the index and removing stale shards of an earlier export are huggingface_hub's
    save_torch_state_dict(hf_sd, out_dir, max_shard_size=max_shard_size)
    written = sorted(f for f in os.listdir(out_dir)
                     if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f))
    for f in written:
        os.chmod(os.path.join(out_dir, f), 0o666 & ~_umask())  # safetensors creates files 0600

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


def _hub_saver():
    """huggingface_hub's sharded safetensors writer (it comes with transformers, the ``hf`` extra)."""
    try:
        from huggingface_hub import save_torch_state_dict
    except ImportError as exc:
        raise ImportError("writing a Hugging Face checkpoint needs huggingface_hub (and transformers): "
                          "pip install -e '.[hf]'") from exc
    return save_torch_state_dict


def _for_saving(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """On the CPU in the export dtype, with storage of its own: per-expert slices are views of one stacked tensor,
    which safetensors (and huggingface_hub's shared-tensor handling) would refuse or drop."""
    t = t.detach().to("cpu", dtype if dtype is not None and t.is_floating_point() else t.dtype)
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


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


def init_from_problems(cfg: ModelConfig, path: str) -> list[str]:
    """Why ``model.init_from=path`` cannot initialise a model of ``cfg``, from its config.json alone (the start-up
    check, before any data or model): a missing directory or config, or every architecture field that differs."""
    try:
        theirs = from_hf_config(_read_hf_config(path))
    except (OSError, ValueError) as exc:
        return [str(exc)]
    bad = config_mismatches(cfg, theirs)
    return [f"model.init_from={path}: its config.json does not match the model config: " + "; ".join(bad)
            + ". Set these model.* fields to the checkpoint's values"] if bad else []


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
    # expert parallelism: a rank holds experts [lo, hi) of each stacked expert weight
    held = {f"{n}.{w}": m.expert_range for n, m in model.named_modules() if hasattr(m, "expert_range")
            for w in ("w_gate", "w_up", "w_down")}
    filled: dict[str, set] = {}
    unexpected = []
    for f in _weight_files(path):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"model.init_from={path}: tensor {k} in {os.path.basename(f)} holds "
                                     f"{int((~torch.isfinite(t)).sum())} NaN/inf values; re-export the checkpoint "
                                     "or start without model.init_from")
                for name, e, v in iter_from_hf(k, t):
                    p = params.get(name)
                    if p is None:
                        unexpected.append(k)
                        continue
                    if name in held:
                        lo, hi = held[name]
                        if e is None:
                            v = v[lo:hi]
                        elif not lo <= e < hi:
                            continue  # another rank's expert
                        else:
                            e -= lo
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
