"""Model FLOPs per token and MFU for Jamba models.

Convention (Megatron-LM / Megatron-core ``num_floating_point_operations`` in megatron/training/training.py,
after Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters", appendix):
a (m x k) @ (k x n) GEMM is 2*m*k*n FLOPs (one multiply + one add per MAC); training = 3 x forward
(backward = data gradient + weight gradient, each as large as the forward); attention's QK^T and AV are
counted over the causal half of the score matrix (s/2 keys per query on average); an MoE layer counts its
router and the top-k experts each token is routed to (not all E); the embedding lookup is free; the LM head
counts. Activation recomputation is not counted (this is model FLOPs -> MFU, not hardware FLOPs -> HFU);
norms, activations, softmax, residual adds, rotary and the Mamba gating are left out as in Megatron.

Per token, h = hidden_size, s = seq_len, V = vocab_size, f = intermediate_size, q = heads * head_dim,
kv = kv_heads * head_dim, d = mamba_expand * h (d_inner), n = mamba_d_state, r = dt_rank, c = mamba_d_conv,
E = num_experts, k = num_experts_per_tok:

  attention layer   2*h*(q + 2*kv)            Q, K, V projections
                    + 2*q*s                   QK^T and AV: 2 GEMMs * 2 FLOPs * q * s / 2 (causal half)
                    + 2*q*h                   output projection
  Mamba-1 layer     2*h*2d                    in_proj (x and gate z)
                    + 2*d*c                   depthwise causal conv
                    + 2*d*(r + 2n)            x_proj (dt, B, C)
                    + 2*r*d                   dt_proj
                    + 9*d*n                   selective scan: discretise exp(dt*A) and dt*B*u, h = dA*h + dBu,
                                              y = C.h  (~9 FLOPs per state element, the Mamba-1 paper's scan
                                              count; Megatron's Mamba-2 formula uses 7*d*n for its SSD scan)
                    + 2*d*h                   out_proj
  short-conv layer  2*h*k + 2*h*h             gated short conv (models/short_conv.py, kernel k =
                                              short_conv_kernel): depthwise conv + gate projection
  dense SwiGLU FFN  2*3*h*f                   gate, up, down
  MoE FFN           2*h*E + k*2*3*h*f         router + the k routed experts
  LM head           2*h*V
  forward = sum over layers + LM head;  training = 3 * forward.

For a dense attention-only model this is 6*N_nonembed_matmul + 6*s*q per layer (with the causal halving),
the familiar "6N + 12*L*h*s" of Kaplan et al. / PaLM with the attention term halved.
"""
from __future__ import annotations

from .models.config import ModelConfig

# Dense BF16 tensor-core peak per GPU (no 2:4 sparsity), from NVIDIA's data sheets.
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM; see "H100 PCIe" below
    "H200": 989e12,
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A800": 312e12,
    "B200": 2250e12,
    "L40S": 362e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict:
    """Model FLOPs per token for a sequence length ``seq_len``: a breakdown by part (forward FLOPs summed
    over all layers of that kind) plus ``forward`` and ``training`` (= 3 * forward) totals."""
    h, s, V, f = cfg.hidden_size, seq_len, cfg.vocab_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    d, n, r, c = cfg.mamba_d_inner, cfg.mamba_d_state, cfg.dt_rank, cfg.mamba_d_conv
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    parts = dict.fromkeys(("attention_proj", "attention_core", "mamba_proj", "mamba_conv", "mamba_scan",
                           "short_conv", "ffn_dense", "moe_router", "moe_experts", "lm_head"), 0)
    counts = {"attention_layers": 0, "mamba_layers": 0, "short_conv_layers": 0, "moe_layers": 0,
              "dense_ffn_layers": 0}
    for i in range(cfg.num_hidden_layers):
        if cfg.is_attention_layer(i):
            counts["attention_layers"] += 1
            parts["attention_proj"] += 2 * h * (q + 2 * kv) + 2 * q * h
            parts["attention_core"] += 2 * q * s  # 4*q*s for QK^T + AV, halved for the causal mask
        elif cfg.is_short_conv_layer(i):
            counts["short_conv_layers"] += 1
            parts["short_conv"] += 2 * h * cfg.short_conv_kernel + 2 * h * h
        else:
            counts["mamba_layers"] += 1
            parts["mamba_proj"] += 2 * h * 2 * d + 2 * d * (r + 2 * n) + 2 * r * d + 2 * d * h
            parts["mamba_conv"] += 2 * d * c
            parts["mamba_scan"] += 9 * d * n
        if cfg.is_moe_layer(i):
            counts["moe_layers"] += 1
            parts["moe_router"] += 2 * h * E
            parts["moe_experts"] += k * 6 * h * f
        elif f:  # intermediate_size 0: no FFN sub-layer
            counts["dense_ffn_layers"] += 1
            parts["ffn_dense"] += 6 * h * f
    parts["lm_head"] = 2 * h * V
    fwd = sum(parts.values())
    return {**parts, "forward": fwd, "training": 3 * fwd, "seq_len": s, **counts}


def mfu(tokens_per_s_per_gpu: float, cfg: ModelConfig, seq_len: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s per GPU over the GPU's peak (None without a peak)."""
    if not peak_flops:
        return None
    return tokens_per_s_per_gpu * flops_per_token(cfg, seq_len)["training"] / peak_flops


def peak_flops_for_device(name: str | None = None, override: float | None = None) -> float | None:
    """Dense BF16 peak FLOP/s of a GPU from its ``torch.cuda.get_device_name()`` string (e.g.
    "NVIDIA H100 80GB HBM3"); ``name=None`` asks torch for device 0. ``override`` (e.g. from the config) wins.
    None on CPU or for an unknown GPU."""
    if override:
        return float(override)
    if name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    up = name.upper()
    if "CPU" in up.split():
        return None
    # longest key first so "H100 PCIe" beats "H100", "GH200" beats "H200"
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.upper() in up:
            return PEAK_BF16_FLOPS[key]
    return None
