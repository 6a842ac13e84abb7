"""SAM 3's text side (spec/sam3.md section 5): a CLIP-style causal transformer over the token ids and
a linear ``resizer`` to the detector width. Tokenizing is :mod:`anyseg.sam3_tokenizer`."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ...config_sam3 import TextEncoderConfig
from .attention import MultiheadAttention


class ClipMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = ClipMlp(width, hidden)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, attn_mask=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(config.width, config.heads, config.mlp_dim)
                                       for _ in range(config.layers))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal)
        return x


class TextEncoder(nn.Module):
    """``B x L`` ids -> ``B x L x width`` (after ``ln_final``). ``text_projection`` is loaded, not used."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.zeros(config.context_length, config.width))
        self.transformer = Transformer(config)
        self.ln_final = nn.LayerNorm(config.width, eps=1e-5)
        self.text_projection = nn.Parameter(torch.zeros(config.width, config.projection_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        # Causal only: padding is masked later, by the detector's attention to the prompt.
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        return self.ln_final(self.transformer(x, causal))


class TextFeatures(NamedTuple):
    """features: ``B x L x d`` (the prompt's text part); mask: ``B x L`` bool, True = padding (``ids == 0``)."""

    features: torch.Tensor
    mask: torch.Tensor


class LanguageBackbone(nn.Module):
    def __init__(self, config: TextEncoderConfig, d_model: int) -> None:
        super().__init__()
        self.encoder = TextEncoder(config)
        self.resizer = nn.Linear(config.width, d_model)

    def forward(self, ids: torch.Tensor) -> TextFeatures:
        return TextFeatures(self.resizer(self.encoder(ids)), ids == 0)
