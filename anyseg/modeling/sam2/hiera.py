"""Hiera trunk of SAM 2 (spec/sam2.md section 2): a hierarchical ViT whose first block of each later
stage max-pools its queries, halving the token grid and doubling the width.

Tokens are channels-last (``B x H x W x C``) inside the trunk; the four stage outputs are returned
channels-first at strides 4, 8, 16 and 32.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config_sam2 import HieraConfig
from ..common import MLP
from ..vit import window_partition, window_unpartition

LN_EPS = 1e-6


def _pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    """2-D max pool of a channels-last ``B x H x W x C`` map (floor of odd sizes)."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Attention over a (window of a) token grid; ``q_stride`` pools the queries before attending."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: Optional[int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)
        self.fused = False  # fast path: scaled_dot_product_attention (anyseg.speed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C_in`` -> ``B x H' x W' x C_out`` (H' = H / q_stride when pooling)."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)
        if self.q_stride:
            q = _pool(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


class MultiScaleBlock(nn.Module):
    """Pre-norm block; ``window == 0`` is global attention. A width change projects the shortcut."""

    def __init__(self, dim: int, dim_out: int, *, num_heads: int, mlp_ratio: float, window: int,
                 q_stride: Optional[int]) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window = window
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride)
        self.norm2 = nn.LayerNorm(dim_out, eps=LN_EPS)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, 2, act=nn.GELU)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = _pool(shortcut, self.q_stride)
        window = self.window
        if window > 0:
            x, padded = window_partition(x, window)
        x = self.attn(x)
        if window > 0:
            if self.q_stride:
                window //= self.q_stride
                h, w = shortcut.shape[1:3]
                padded = (h + (window - h % window) % window, w + (window - w % window) % window)
            x = window_unpartition(x, window, padded, tuple(shortcut.shape[1:3]))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Hiera(nn.Module):
    def __init__(self, config: HieraConfig) -> None:
        super().__init__()
        self.config = config
        dim, heads = config.embed_dim, config.num_heads
        self.stage_ends = config.stage_ends
        q_pool_blocks = set(config.q_pool_blocks)
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *config.window_pos_embed_bkg_spatial_size))
        w0 = config.window_spec[0]
        self.pos_embed_window = nn.Parameter(torch.zeros(1, dim, w0, w0))
        blocks = []
        stage = 0
        for i in range(config.depth):
            dim_out = dim
            # The window is the one of the stage the block starts in (a q-pool block still uses the
            # previous stage's window on its un-pooled input).
            window = 0 if i in config.global_att_blocks else config.window_spec[stage]
            if i - 1 in self.stage_ends:
                dim_out = int(dim * config.dim_mul)
                heads = int(heads * config.head_mul)
                stage += 1
            blocks.append(MultiScaleBlock(dim, dim_out, num_heads=heads, mlp_ratio=config.mlp_ratio, window=window,
                                          q_stride=config.q_stride[0] if i in q_pool_blocks else None))
            dim = dim_out
        self.blocks = nn.ModuleList(blocks)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Bicubic-resized background plus the tiled window embedding: ``1 x h x w x C``."""
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic", align_corners=False)
        win = self.pos_embed_window
        pos = pos + win.tile([1, 1, h // win.shape[-2], w // win.shape[-1]])
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Normalised ``B x 3 x S x S`` -> stage outputs ``[B x D x S/4 ..., B x 8D x S/32 ...]``."""
        x = self.patch_embed(x)
        x = x + self.position_embedding(*x.shape[1:3])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
