"""Grouped-query causal self-attention through ``scaled_dot_product_attention``.

No positional embedding by default (Jamba: the Mamba layers carry position); RoPE is an option
for the paper's ablation. On CUDA, SDPA dispatches to flash attention for bf16/fp16 inputs. Packed documents
(``doc_starts``) on CUDA take FlexAttention with a block-sparse document-causal mask (``document_block_mask``):
compiled, it skips the blocks across documents and never builds a (seq x seq) mask; elsewhere SDPA takes the
dense boolean mask.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .fused_ops import maybe_compiled
from .layers import apply_rotary, linear, rotary_cos_sin

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = create_block_mask = flex_attention = None


def flex_available() -> bool:
    return flex_attention is not None


def document_block_mask(doc_starts: torch.Tensor):
    """FlexAttention BlockMask for packed documents: position q may attend kv when kv <= q in the same document.
    doc_starts: bool (batch, seq), True where a document begins."""
    doc = torch.cumsum(doc_starts.long(), dim=1)
    B, L = doc.shape

    def same_document_causal(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, B, None, L, L, device=doc.device, _compile=doc.is_cuda)


def document_dense_mask(doc_starts: torch.Tensor) -> torch.Tensor:
    """The same mask as a dense boolean (batch, 1, seq, seq) tensor, for SDPA."""
    doc = torch.cumsum(doc_starts.long(), dim=1)
    L = doc.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def _flex(q, k, v, block_mask, gqa: bool):
    """flex_attention, compiled into one fused kernel on CUDA (eager flex materialises the scores)."""
    return maybe_compiled(flex_attention, q.is_cuda)(q, k, v, block_mask=block_mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.use_rope = cfg.use_rope
        self.rope_theta = cfg.rope_theta
        self.q_proj = linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.cp_group = None  # a context_parallel.CPGroup, set by context_parallel.apply (None: cp = 1)

    def forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        """x: (batch, seq, hidden). attn_mask: optional boolean (batch, 1, seq, seq), True = may attend, or a
        FlexAttention BlockMask (``document_block_mask``). Under context parallelism (Ulysses) x is this rank's
        slice of the sequence and attn_mask the whole sequence's mask: q, k, v go all-to-all to the whole sequence
        for heads/cp heads (KV heads split, or replicated one per rank when they are fewer than cp), attention runs
        with the whole sequence's causality, documents and RoPE positions, and the output goes all-to-all back."""
        return self.out(self.attend(*self.qkv(x), attn_mask))

    def qkv(self, x: torch.Tensor):
        """The input side: q (batch, heads, seq, head_dim), k, v (batch, kv_heads, seq, head_dim)."""
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, attn_mask=None) -> torch.Tensor:
        """Attention proper (context-parallel all-to-all, RoPE, SDPA / FlexAttention): (batch, heads, seq,
        head_dim) out. Kept eager by ``compiled_blocks`` (the collectives, the flash / flex kernels)."""
        cp = self.cp_group
        if cp is not None:
            from ..parallel import context_parallel as cpx

            if cp.size > self.num_kv_heads:  # one (replicated) KV head per rank, the one its query heads use
                k, v = (t.repeat_interleave(cp.size // self.num_kv_heads, dim=1) for t in (k, v))
            q, k, v = (cpx.seq_to_channels(t.transpose(2, 3), cp, dim=1).transpose(2, 3) for t in (q, k, v))
        if self.use_rope:
            cos, sin = rotary_cos_sin(q.shape[2], self.head_dim, self.rope_theta, q.device, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = q.shape[1] != k.shape[1]
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif BlockMask is not None and isinstance(attn_mask, BlockMask):
            out = _flex(q, k, v, attn_mask, gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        if cp is not None:
            out = cpx.channels_to_seq(out.transpose(2, 3), cp, dim=1).transpose(2, 3)  # (b, heads, l, head_dim)
        return out

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """The output side: o (batch, heads, seq, head_dim) -> o_proj, (batch, seq, hidden)."""
        b, _, l, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))
