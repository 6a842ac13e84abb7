"""Multi-head attention with ``torch.nn.MultiheadAttention``'s parameters and masks (spec/sam3.md,
notation): ``in_proj_weight`` (3d x d, rows q | k | v), ``in_proj_bias``, ``out_proj``.

Tensors are batch-first (``B x L x d``) here. The reference computes SAM 3's attention with
``scaled_dot_product_attention``, so that is the default here too (``use_sdpa``, float32, the same
numbers as the reference to ~1e-6); ``use_sdpa = False`` gives the explicit softmax, which agrees
with it to rounding and is kept as a readable statement of the math.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim) + bias) v`` over the last two axes (``... x L x head_dim``)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


class MultiheadAttention(nn.Module):
    """Attention with separate query / key / value inputs, all of width ``dim``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.use_sdpa = True

    def _heads(self, x: torch.Tensor, i: int) -> torch.Tensor:
        d = self.out_proj.in_features
        x = F.linear(x, self.in_proj_weight[i * d:(i + 1) * d], self.in_proj_bias[i * d:(i + 1) * d])
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_padding_mask: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q: ``B x Lq x d``; k, v: ``B x Lk x d``. key_padding_mask: ``B x Lk`` bool, True = ignore.
        attn_mask: additive float ``(B * heads) x Lq x Lk`` (or broadcastable ``Lq x Lk``)."""
        b, lq, d = q.shape
        qh, kh, vh = self._heads(q, 0), self._heads(k, 1), self._heads(v, 2)
        bias = None
        if attn_mask is not None:
            bias = attn_mask.view(b, self.num_heads, lq, -1) if attn_mask.dim() == 3 else attn_mask
        if key_padding_mask is not None:
            pad = torch.zeros(key_padding_mask.shape, dtype=qh.dtype, device=qh.device)
            pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
            bias = pad if bias is None else bias + pad
        if bias is not None:
            bias = bias.to(qh.dtype)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
        else:
            out = plain_attention(qh, kh, vh, bias)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, d))
