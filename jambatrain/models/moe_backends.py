"""Expert-computation backends behind one signature: fn(x, routing, w_gate, w_up, w_down) -> y."""
from __future__ import annotations

from .moe import experts_forward_native


def select(impl: str, x):
    if impl in ("auto", "native"):
        return experts_forward_native
    raise RuntimeError(f"model.moe_impl={impl!r} is not available in this build: use model.moe_impl=native")
