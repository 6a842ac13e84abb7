"""Dot-product scoring (spec/sam3.md section 10): each query's logit is its projection dotted with the
projected mean of the prompt tokens, scaled by ``1/sqrt(d)`` and clamped."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PromptMlp(nn.Module):
    """``out_norm(p + L2(ReLU(L1(p))))`` (keys ``layers.0``, ``layers.1``, ``out_norm``)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, hidden), nn.Linear(hidden, d)])
        self.out_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.out_norm(p + self.layers[1](F.relu(self.layers[0](p))))


class DotProductScoring(nn.Module):
    def __init__(self, d: int, hidden: int, clamp: float) -> None:
        super().__init__()
        self.prompt_mlp = PromptMlp(d, hidden)
        self.prompt_proj = nn.Linear(d, d)
        self.hs_proj = nn.Linear(d, d)
        self.clamp = clamp

    def forward(self, hs: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """hs: ``B x Q x d``; prompt: ``B x P x d``; prompt_mask: ``B x P`` (True = ignore) -> ``B x Q`` logits."""
        p = self.prompt_mlp(prompt)
        keep = (~prompt_mask).to(p.dtype)[..., None]
        pooled = (p * keep).sum(1) / keep.sum(1).clamp(min=1)
        logits = (self.hs_proj(hs) @ self.prompt_proj(pooled)[..., None])[..., 0] / math.sqrt(hs.shape[-1])
        return logits.clamp(-self.clamp, self.clamp)
