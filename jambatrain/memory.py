"""Inference-state memory per sequence: ``python -m jambatrain.memory [hydra overrides] --context N [--dtype bfloat16]``.

For the config composed from ``conf/train.yaml`` + the overrides (e.g. ``experiment=jamba_v0_1``), and for the
Jamba paper's comparison models given as Hugging Face config numbers, prints the KV cache and the Mamba state one
sequence holds at ``N`` tokens; the last line is ``kv cache at N tokens: X GiB`` for the composed config.

Formula (bytes per sequence, ``b`` bytes per element of ``--dtype``):

    KV cache    = n_attention_layers x 2 (K and V) x num_key_value_heads x head_dim x N x b
    Mamba state = n_mamba_layers x d_inner x (d_state + d_conv) x b            (independent of N)

with ``head_dim = hidden_size / num_attention_heads`` and ``d_inner = mamba_expand x hidden_size``. The Mamba
state is the SSM state (d_inner x d_state) plus the convolution window (d_inner x d_conv), the shapes of
Hugging Face's ``HybridMambaAttentionDynamicCache`` (transformers ``models/jamba/modeling_jamba.py``: ``conv_states``
(batch, d_inner, d_conv), ``ssm_states`` (batch, d_inner, d_state)) and of mamba-ssm's
``Mamba.allocate_inference_cache``; K and V are cached per KV head after the k/v projections
(GQA: ``num_key_value_heads`` heads).

Sources of the comparison layouts (their ``config.json`` on the Hugging Face Hub):
  * Mixtral 8x7B (mistralai/Mixtral-8x7B-v0.1): 32 layers, all attention, hidden 4096, 32 heads, 8 KV heads;
  * Llama-2 7B (meta-llama/Llama-2-7b-hf): 32 layers, all attention, hidden 4096, 32 heads, 32 KV heads (no GQA);
  * Jamba v0.1 (ai21labs/Jamba-v0.1; our ``conf/model/jamba_v0_1.yaml``): 32 layers, 1 attention in 8, 8 KV heads.
The Jamba paper (Lieber et al. 2024, arXiv 2403.19887, Table 1) lists the KV cache at 256K tokens in 16-bit
precision as Jamba 4 GB, Mixtral 32 GB, Llama-2 7B 128 GB; the formula gives exactly 4, 32 and 128 GiB
(2^30 bytes) at N = 262,144 (``tests/test_memory.py`` holds it to that, and to hand-computed values).
``measure`` (used by bench/ablation_sweep.sh on a GPU) checks the formula against the bytes of the K/V tensors a
real forward produces and the allocation of the Mamba state tensors.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}
GIB = 2**30


@dataclass
class Layout:
    """The numbers the formula needs, in Hugging Face config terms."""
    name: str
    num_hidden_layers: int
    num_attention_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    mamba_expand: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_mamba_layers(self) -> int:
        return self.num_hidden_layers - self.num_attention_layers

    def kv_cache_bytes(self, context: int, dtype_bytes: int) -> int:
        return self.num_attention_layers * 2 * self.num_key_value_heads * self.head_dim * context * dtype_bytes

    def mamba_state_bytes(self, dtype_bytes: int) -> int:
        d_inner = self.mamba_expand * self.hidden_size
        return self.num_mamba_layers * d_inner * (self.mamba_d_state + self.mamba_d_conv) * dtype_bytes


# the paper's Table 1 comparisons, from their HF config.json (module docstring)
MIXTRAL_8X7B = Layout("Mixtral 8x7B", 32, 32, 4096, 32, 8)
LLAMA2_7B = Layout("Llama-2 7B", 32, 32, 4096, 32, 32)


def layout_of(mcfg) -> Layout:
    """The Layout of a jambatrain ModelConfig (attention layers counted from its period/offset)."""
    n_attn = sum(mcfg.is_attention_layer(i) for i in range(mcfg.num_hidden_layers))
    return Layout(mcfg.name, mcfg.num_hidden_layers, n_attn, mcfg.hidden_size, mcfg.num_attention_heads,
                  mcfg.num_key_value_heads, mcfg.mamba_expand, mcfg.mamba_d_state, mcfg.mamba_d_conv)


def report(layout: Layout, context: int, dtype: str) -> dict:
    b = DTYPE_BYTES[dtype]
    kv, state = layout.kv_cache_bytes(context, b), layout.mamba_state_bytes(b)
    return {"name": layout.name, "context": context, "dtype": dtype, "attention_layers": layout.num_attention_layers,
            "mamba_layers": layout.num_mamba_layers, "kv_cache_bytes": kv, "mamba_state_bytes": state,
            "kv_cache_gib": kv / GIB, "mamba_state_gib": state / GIB, "total_gib": (kv + state) / GIB}


def measure(model, context: int, device, dtype) -> dict:
    """Measured on ``model`` (a JambaLM on ``device`` in ``dtype``): the bytes of the K and V tensors the attention
    layers compute in a forward of one ``context``-token sequence (captured from k_proj / v_proj, i.e. what a KV
    cache stores), and the bytes ``torch.cuda.memory_allocated`` (or nbytes on CPU) grows by when the Mamba
    conv + SSM state tensors of every Mamba layer are allocated as inference caches do."""
    import torch

    from .models.attention import Attention
    from .models.mamba import MambaMixer

    kv = {"bytes": 0}
    hooks = []
    for m in model.modules():
        if isinstance(m, Attention):
            for proj in (m.k_proj, m.v_proj):
                hooks.append(proj.register_forward_hook(
                    lambda mod, inp, out: kv.__setitem__("bytes", kv["bytes"] + out.numel() * out.element_size())))
    ids = torch.randint(0, model.cfg.vocab_size, (1, context), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        model.hidden_states(ids)
    for h in hooks:
        h.remove()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    states = [(torch.zeros(1, m.d_inner, m.conv1d.kernel_size[0], device=device, dtype=dtype),
               torch.zeros(1, m.d_inner, m.d_state, device=device, dtype=dtype)) for m in mixers]
    if device.type == "cuda":
        state_bytes = torch.cuda.memory_allocated(device) - before
    else:
        state_bytes = sum(c.nbytes + s.nbytes for c, s in states)
    del states
    return {"kv_cache_bytes_measured": kv["bytes"], "mamba_state_bytes_measured": state_bytes,
            "forward_peak_bytes": peak}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m jambatrain.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, required=True, help="tokens in the sequence, e.g. 262144")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [o for o in overrides if "=" not in o]
    if bad or args.context < 1:
        p.error(f"arguments other than --context N (>= 1) and --dtype must be Hydra overrides key=value: {bad}")
    from .runs import compose_model_config

    mine = layout_of(compose_model_config(overrides))
    rows = [report(x, args.context, args.dtype) for x in (MIXTRAL_8X7B, LLAMA2_7B, mine)]
    print(f"{'model':<16}{'attn/mamba layers':>18}{'KV cache':>14}{'Mamba state':>14}   ({args.context:,} tokens, "
          f"{args.dtype}, per sequence)")
    for r in rows:
        print(f"{r['name']:<16}{r['attention_layers']:>9}/{r['mamba_layers']:<8}{r['kv_cache_gib']:>10.3f} GiB"
              f"{r['mamba_state_bytes'] / 2**20:>10.1f} MiB")
    print(f"kv cache at {args.context} tokens: {rows[-1]['kv_cache_gib']:.3f} GiB")
    return rows


if __name__ == "__main__":
    main()
