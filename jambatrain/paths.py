"""Where jambatrain finds its Hydra configs, shared by the trainer (``jambatrain.train``) and the planner
(``jambatrain.plan``) so that neither imports the other for it."""
from __future__ import annotations

import os

# the repo's conf/ next to the package (an editable install or a checkout); JAMBATRAIN_CONF_DIR points elsewhere
CONF_DIR = os.environ.get("JAMBATRAIN_CONF_DIR") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf"))


def require_configs() -> None:
    """Say where the Hydra configs were looked for when they are missing, instead of Hydra's bare "primary config
    directory not found"."""
    if not os.path.isfile(os.path.join(CONF_DIR, "train.yaml")):
        raise SystemExit(f"jambatrain: no Hydra configs at {CONF_DIR} (it needs conf/train.yaml and its groups): "
                         "install from a checkout with `pip install -e .`, or set JAMBATRAIN_CONF_DIR to the "
                         "checkout's conf/ directory")


def cache_root() -> str:
    """Where the embedded default corpus is built: $JAMBATRAIN_CACHE, else ~/.cache/jambatrain (expanded)."""
    return os.path.expanduser(os.environ.get("JAMBATRAIN_CACHE") or "~/.cache/jambatrain")
