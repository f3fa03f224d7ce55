"""Export a jambatrain DeepSpeed checkpoint as a Hugging Face Jamba model directory.

    python -m jambatrain.export_hf RUN_OR_CHECKPOINT_DIR OUT_DIR [--tokenizer PATH] [--tag step_00000100]
                                  [--config RUN_DIR/.hydra/config.yaml] [--dtype bfloat16] [--max-shard-size 5GB]

RUN_OR_CHECKPOINT_DIR is any of
  * a run dir:            RUN_DIR (with RUN_DIR/checkpoints/latest and RUN_DIR/.hydra/config.yaml)
  * a checkpoint root:    RUN_DIR/checkpoints (the tag is read from its ``latest`` file)
  * one checkpoint:       RUN_DIR/checkpoints/step_00000100
The model config is the one stored with the checkpoint (``model_config`` of its train_state.json, written by
jambatrain.checkpoint), else the ``model:`` section of the run's Hydra config (found by walking up from the
checkpoint to a ``.hydra/config.yaml``), or the ``model:`` section of --config FILE when given.
DeepSpeed's ``zero_to_fp32`` consolidates the fp32 master weights of any ZeRO stage and data-parallel size on
CPU; a stage-0 checkpoint (no ZeRO optimizer shards) is read from its model-states file. Then
``jambatrain.hf_io.save_hf_pretrained`` writes config.json, generation_config.json, model*.safetensors
(--dtype, default bfloat16) and, when a tokenizer is given or found in the run's data config (data.dir holds
tokenizer.model; ${oc.env:...} and ${jambatrain_cache:} interpolations resolve from the current
environment), the tokenizer files.
Load the result with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` / ``AutoTokenizer.from_pretrained``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import fields

from .models.config import ModelConfig


def resolve_checkpoint(src: str, tag: str | None = None) -> tuple[str, str]:
    """(checkpoint root, tag) for a run dir, a checkpoint root or a single checkpoint dir; without ``tag``, the
    newest complete checkpoint whose contents match their checksums (the one a resume would take, never a
    half-written or corrupt one; the ones passed over are named on stderr). A named checkpoint is verified too."""
    from .checkpoint import _tags, verify_reason

    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} is not a directory")
    if os.path.isfile(os.path.join(src, "manifest.json")):  # a tag dir
        root, tag = os.path.dirname(src), os.path.basename(src)
    elif os.path.isdir(os.path.join(src, "checkpoints")):
        root = os.path.join(src, "checkpoints")
    else:
        root = src
    if tag is None:
        for t in _tags(root):
            reason = verify_reason(os.path.join(root, t))
            if reason is None:
                tag = t
                break
            print(f"jambatrain: WARNING: checkpoint {os.path.join(root, t)} passed over: {reason}", file=sys.stderr,
                  flush=True)
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint at {src}: expected RUN_DIR/checkpoints/step_XXXXXXXX, "
                                    "CKPT_ROOT/step_XXXXXXXX or a step dir, each with its manifest.json (or pass --tag)")
        return root, tag
    reason = verify_reason(os.path.join(root, tag))
    if reason:
        raise FileNotFoundError(f"checkpoint {os.path.join(root, tag)} is not complete ({reason})")
    return root, tag


def find_run_config(start: str) -> str | None:
    d = os.path.abspath(start)
    for _ in range(4):
        p = os.path.join(d, ".hydra", "config.yaml")
        if os.path.isfile(p):
            return p
        d = os.path.dirname(d)
    return None


def load_run_config(path: str) -> dict:
    """The run's Hydra config as a dict; each top-level section resolved on its own (a section whose
    interpolations cannot be resolved outside the run, e.g. ${hydra:...}, is kept unresolved)."""
    from omegaconf import OmegaConf

    from . import config  # noqa: F401 - registers the ${jambatrain_cache:} resolver of the data config

    cfg = OmegaConf.load(path)
    out = {}
    for k in cfg:
        try:
            v = cfg[k]
            out[k] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        except Exception:  # noqa: BLE001
            out[k] = OmegaConf.to_container(cfg, resolve=False)[k]
    return out


def model_config_from_checkpoint(root: str, tag: str) -> dict | None:
    """The model config jambatrain.checkpoint stored next to the weights (train_state.json), if any."""
    p = os.path.join(root, tag, "train_state.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        mc = json.load(f).get("model_config")
    return mc or None


def model_config_from_dict(model: dict, source: str = "") -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(model) - known - {"_target_"})
    if unknown:
        print(f"export_hf: ignoring model keys ModelConfig does not know ({source}): {unknown}", file=sys.stderr)
    return ModelConfig(**{k: v for k, v in model.items() if k in known})


def find_tokenizer(run_cfg: dict, run_dir: str | None) -> str | None:
    """A tokenizer.model named in the run's data config (a .model file, or a dir holding tokenizer.model),
    else RUN_DIR/tokenizer.model."""
    cands = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x:
            cands.append(os.path.expanduser(x))

    walk(run_cfg.get("data", {}))
    for c in cands:
        if c.endswith(".model") and os.path.isfile(c):
            return c
    for c in cands:
        if os.path.isdir(c) and os.path.isfile(os.path.join(c, "tokenizer.model")):
            return os.path.join(c, "tokenizer.model")
    if run_dir and os.path.isfile(os.path.join(run_dir, "tokenizer.model")):
        return os.path.join(run_dir, "tokenizer.model")
    return None


def check_tokenizer(tokenizer: str, run_cfg: dict) -> None:
    """Refuse a tokenizer whose sha256 differs from the manifest of the shards the run trained on (the run
    config's data.dir), or from a manifest.json next to the tokenizer."""
    from .data.shards import MANIFEST, read_manifest, tokenizer_problem

    data_dir = (run_cfg.get("data") or {}).get("dir")
    for d in ([os.path.expanduser(data_dir)] if isinstance(data_dir, str) else []) + [os.path.dirname(tokenizer)]:
        if os.path.isfile(os.path.join(d, MANIFEST)):
            problem = tokenizer_problem(d, read_manifest(d, check_files=False, check_tokenizer=False), path=tokenizer)
            if problem:
                raise SystemExit(f"export_hf: not shipping the tokenizer: {problem}. Or pass --tokenizer with the "
                                 "original file, or --no-tokenizer")
            return


def consolidated_state_dict(root: str, tag: str) -> dict:
    """fp32 state dict with the JambaLM's own parameter names (all experts), from a checkpoint of any layout."""
    import json

    from .checkpoint import portable_state_dict

    ckpt = os.path.join(root, tag)
    with open(os.path.join(ckpt, "manifest.json")) as f:
        if json.load(f)["kind"] == "portable":
            return portable_state_dict(ckpt)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # ZeRO-3: DeepSpeed's files

    from .hf_convert import _strip_prefix

    return _strip_prefix(dict(get_fp32_state_dict_from_zero_checkpoint(root, tag)))


def check_state_dict(sd: dict, cfg: ModelConfig) -> None:
    """Names and shapes must be those of JambaLM(cfg) (built on the meta device: no memory)."""
    import torch

    from .models import JambaLM

    with torch.device("meta"):
        ref = JambaLM(cfg).state_dict()
    missing = sorted(set(ref) - set(sd))
    if cfg.tie_word_embeddings and missing == ["lm_head.weight"]:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
        missing = []
    unexpected = sorted(set(sd) - set(ref))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(ref[k].shape)}"
              for k in ref if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError("the checkpoint does not match the run's model config:\n"
                         f"  missing: {missing}\n  unexpected: {unexpected}\n  shape mismatches: {shapes}")


def export(src: str, out_dir: str, tokenizer: str | None = None, tag: str | None = None, config: str | None = None,
           dtype: str = "bfloat16", max_shard_size: str = "5GB", find_tok: bool = True) -> list[str]:
    from .hf_io import save_hf_pretrained

    root, tag = resolve_checkpoint(src, tag)
    run_config = config or find_run_config(root)
    run_cfg = load_run_config(run_config) if run_config else {}
    stored = None if config else model_config_from_checkpoint(root, tag)
    if stored is not None:  # what this checkpoint was trained with; wins over a later .hydra/config.yaml
        cfg, source = model_config_from_dict(stored, "train_state.json"), os.path.join(root, tag, "train_state.json")
    elif "model" in run_cfg:
        cfg, source = model_config_from_dict(run_cfg["model"], run_config), run_config
    else:
        raise FileNotFoundError(f"no model config for {os.path.join(root, tag)}: no train_state.json in it and no "
                                ".hydra/config.yaml with a `model:` section above it; pass --config FILE")
    if tokenizer is None and find_tok:
        tokenizer = find_tokenizer(run_cfg, os.path.dirname(os.path.dirname(run_config)) if run_config else None)
    if tokenizer is not None:  # before the (slow) consolidation: never ship a tokenizer the model was not trained on
        check_tokenizer(tokenizer, run_cfg)
    print(f"export_hf: checkpoint {os.path.join(root, tag)}, model config from {source}, tokenizer {tokenizer}",
          file=sys.stderr)
    try:  # before any work: the HF config class comes from transformers
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("export_hf: needs transformers to write the HF config: pip install -e '.[hf]' "
                         "(or pip install 'transformers>=5.0'); nothing was written") from None
    sd = consolidated_state_dict(root, tag)
    check_state_dict(sd, cfg)
    # written next to out_dir and moved in only when complete: a failed export never leaves a half-written dir
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.partial-{os.getpid()}"
    try:
        written = save_hf_pretrained(sd, cfg, tmp, tokenizer_path=tokenizer, max_shard_size=max_shard_size,
                                     dtype=dtype)
        os.makedirs(out_dir, exist_ok=True)
        for f in os.listdir(out_dir):  # stale shards of an earlier export would shadow the new index
            if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".safetensors.index.json")):
                os.remove(os.path.join(out_dir, f))
        for f in os.listdir(tmp):
            os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"export_hf: wrote {', '.join(written)} to {out_dir}", file=sys.stderr)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jambatrain.export_hf", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="run dir, checkpoint root (with `latest`) or one checkpoint dir")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer", help="SentencePiece .model to ship (default: the one in the run's data config)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not look for a tokenizer")
    p.add_argument("--tag", help="checkpoint tag (default: the `latest` file)")
    p.add_argument("--config", help="a Hydra config whose model: section to use (default: the checkpoint's "
                   "train_state.json, else .hydra/config.yaml above src)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--max-shard-size", default="5GB")
    a = p.parse_args(argv)
    export(a.src, a.out_dir, tokenizer=a.tokenizer, tag=a.tag, config=a.config, dtype=a.dtype,
           max_shard_size=a.max_shard_size, find_tok=not a.no_tokenizer)


if __name__ == "__main__":
    main()
