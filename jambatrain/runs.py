"""A run's pieces, for the tools around the trainer: which checkpoint a path names, where its Hydra config is, and the
config composed the way the trainer composes it. Used by ``eval``, ``export_hf``, ``plan`` and ``memory`` (and
``bench/``), none of which imports the trainer (``jambatrain.train``) for it.

    resolve_checkpoint(src)         a run dir, its checkpoints/ dir or one step dir -> (checkpoint root, tag)
    find_run_config(start)          the run's .hydra/config.yaml above a path
    compose(overrides)              conf/train.yaml + overrides through Hydra, with the typed schema
    compose_train_config(...)       ... as a TrainConfig (plan);  compose_model_config(...): its model (memory)
    compose_for_checkpoint(src, o)  the run's own overrides + ``o``, the architecture from the checkpoint (eval)
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import fields

from .models.config import ModelConfig, runtime_fields
from .paths import CONF_DIR, require_configs


# ---------------------------------------------------------------- which checkpoint, which config
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
    else:
        root = os.path.join(src, "checkpoints") if os.path.isdir(os.path.join(src, "checkpoints")) else src
    if tag is None:
        for t in _tags(root):
            reason = verify_reason(os.path.join(root, t))
            if reason is None:
                return root, t
            print(f"jambatrain: WARNING: checkpoint {os.path.join(root, t)} passed over: {reason}", file=sys.stderr,
                  flush=True)
        raise FileNotFoundError(f"no complete checkpoint at {src}: expected RUN_DIR/checkpoints/step_XXXXXXXX, "
                                "CKPT_ROOT/step_XXXXXXXX or a step dir, each with its manifest.json (or pass --tag)")
    reason = verify_reason(os.path.join(root, tag))
    if reason:
        raise FileNotFoundError(f"checkpoint {os.path.join(root, tag)} is not complete ({reason})")
    return root, tag


def find_run_config(start: str) -> str | None:
    """The run's ``.hydra/config.yaml`` in ``start`` or up to three directories above it (None: none)."""
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
        print(f"jambatrain: ignoring model keys ModelConfig does not know ({source}): {unknown}", file=sys.stderr)
    return ModelConfig(**{k: v for k, v in model.items() if k in known})


# ---------------------------------------------------------------- composing the config as the trainer does
def compose(overrides: list[str], hydra_cfg: bool = False):
    """``conf/train.yaml`` + ``overrides`` composed by Hydra on the typed schema (a DictConfig, unresolved)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from .config import register_schema

    require_configs()
    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def compose_train_config(overrides: list[str]):
    """The ``TrainConfig`` the trainer would run with these overrides (required values must be set)."""
    from .config import to_train_config

    return to_train_config(compose(overrides))


def compose_model_config(overrides: list[str]) -> ModelConfig:
    """The model section only: a preset whose ``data.dir`` is left ``???`` needs no data here."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose(overrides).model)


def compose_for_checkpoint(src: str, overrides: list[str], tool: str = "jambatrain"):
    """(TrainConfig, checkpoint root, tag, run dir) for the checkpoint ``src`` names: Hydra-composed from the run's
    own overrides (``RUN_DIR/.hydra/overrides.yaml``) + ``overrides``; the architecture from the checkpoint's
    train_state.json, the run-time knobs (``runtime_fields``) from the composition, so they may be overridden."""
    from omegaconf import OmegaConf

    try:
        root, tag = resolve_checkpoint(src)
    except FileNotFoundError as exc:
        raise SystemExit(f"{tool}: {exc}") from None
    run_config = find_run_config(root)
    run_dir = os.path.dirname(os.path.dirname(run_config)) if run_config else os.path.dirname(root)
    run_overrides = []
    if run_config and os.path.isfile(os.path.join(os.path.dirname(run_config), "overrides.yaml")):
        saved = OmegaConf.load(os.path.join(os.path.dirname(run_config), "overrides.yaml"))
        run_overrides = [o for o in saved if not o.lstrip("+~").startswith("hydra")]
    cfg = compose_train_config(run_overrides + list(overrides))
    stored = model_config_from_checkpoint(root, tag)
    if stored:
        knobs = {k: getattr(cfg.model, k) for k in runtime_fields()}
        cfg.model = model_config_from_dict({**stored, **knobs}, "train_state.json")
    return cfg, root, tag, run_dir
