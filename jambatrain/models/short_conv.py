"""Gated short convolution mixer: Zoology's ``BaseConv`` with a short kernel (HazyResearch/zoology,
``zoology/mixers/base_conv.py`` + ``convolution.ShortConvolution``), the token shift of their attention baseline.

``y = causal_depthwise_conv_k(x) * Linear(x) + x``: a depthwise causal conv over ``kernel`` positions (with bias),
gated elementwise by a linear projection (with bias), plus the input. A layer of it before an attention layer
lets the attention layer match a query against the token *after* each key (the MQAR lookup), which attention
without positions cannot do alone. Selected per layer by ``model.short_conv_layer_period`` / ``_offset``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class ShortConvMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, k = cfg.hidden_size, cfg.short_conv_kernel
        self.kernel = k
        self.conv = nn.Conv1d(h, h, kernel_size=k, groups=h, padding=0)
        self.projection = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, reset=None) -> torch.Tensor:
        """x: (batch, seq, hidden). ``reset`` (document starts) is refused at config time (config.problems)."""
        if reset is not None:
            raise ValueError("the short-conv mixer does not take a document mask: set data.doc_mask=false")
        u = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))  # causal: position t sees t-k+1 .. t
        return self.conv(u).transpose(1, 2) * self.projection(x) + x
