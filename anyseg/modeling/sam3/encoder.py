"""The fusion encoder (spec/sam3.md section 8): image tokens attend to themselves (with position) and
to the prompt (text ++ geometry tokens); pre-norm, no final norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiheadAttention


class PreNormLayer(nn.Module):
    """The modules of a pre-norm layer with self-attention, cross-attention and a ReLU FFN (the reference's
    key names); the fusion encoder and the geometry encoder differ only in what they attend to."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d, heads)
        self.cross_attn_image = MultiheadAttention(d, heads)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.norm3 = nn.LayerNorm(d, eps=1e-5)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(self.norm3(x))))


class FusionLayer(PreNormLayer):
    def forward(self, x, pos, prompt, prompt_mask):
        y = self.norm1(x)
        q = y + pos
        x = x + self.self_attn(q, q, y)
        # Named after the reference's key, although here the image tokens attend to the prompt.
        x = x + self.cross_attn_image(self.norm2(x), prompt, prompt, key_padding_mask=prompt_mask)
        return x + self.ffn(x)


class FusionEncoder(nn.Module):
    """``B x HW x d`` image tokens, their position, the prompt ``B x P x d`` and its mask -> ``B x HW x d``."""

    def __init__(self, d: int, heads: int, ffn: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(d, heads, ffn) for _ in range(layers))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor):
        for layer in self.layers:
            x = layer(x, pos, prompt, prompt_mask)
        return x
