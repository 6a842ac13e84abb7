"""The Perception Encoder ViT of SAM 3 (spec/sam3.md section 3): patch embedding without bias, the
pretraining position table tiled over the grid, ``ln_pre``, and blocks of windowed or global
attention, all with 2-D axial RoPE."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ...config_sam3 import PerceptionViTConfig
from .attention import plain_attention


def rope_table(n: int, head_dim: int, *, scale: float = 1.0, theta: float = 10000.0) -> torch.Tensor:
    """``(n*n) x head_dim/2`` complex64 rotations of an ``n x n`` grid (row-major tokens).

    Token ``t`` sits at ``(x, y) = (t mod n, t div n) * scale``; the first half of the columns rotate
    by ``x * f_j``, the second half by ``y * f_j``, ``f_j = theta^(-4j / head_dim)``.
    """
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4, dtype=torch.float32)[:quarter] / head_dim)
    t = torch.arange(n * n, dtype=torch.float32)
    x = (t % n) * scale
    y = torch.div(t, n, rounding_mode="floor") * scale
    angles = torch.cat([torch.outer(x, freqs), torch.outer(y, freqs)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate ``... x L x head_dim`` by ``L x head_dim/2`` complex numbers (adjacent channel pairs)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)


class RopeAttention(nn.Module):
    """Self-attention of one block (``attn.qkv``, ``attn.proj``) with its RoPE table ``freqs_cis``."""

    def __init__(self, dim: int, num_heads: int, *, grid: int, scale: float, theta: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # Loaded from the checkpoint like the reference (the file's values equal these).
        self.register_buffer("freqs_cis", rope_table(grid, dim // num_heads, scale=scale, theta=theta))
        self.use_sdpa = True  # as the reference; False: explicit softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``B x h x w x D`` (one window or the whole grid per batch entry)."""
        b, h, w, d = x.shape
        qkv = self.qkv(x).view(b, h * w, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = apply_rope(q, self.freqs_cis), apply_rope(k, self.freqs_cis)
        out = F.scaled_dot_product_attention(q, k, v) if self.use_sdpa else plain_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``B x H x W x D`` -> ``(B * nH * nW) x window x window x D``, windows row-major (H, W multiples of window)."""
    b, h, w, d = x.shape
    x = x.view(b, h // window, window, w // window, window, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, d)


def window_unpartition(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    d = x.shape[-1]
    x = x.view(-1, h // window, w // window, window, window, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, d)


class Block(nn.Module):
    """Pre-norm block; ``window`` = 0 for global attention."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *, window: int, grid: int, theta: float) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        # Global blocks use interpolated RoPE: positions scaled so the grid spans one window's range.
        rope_grid, rope_scale = (window, 1.0) if window else (grid, 24 / grid)
        self.attn = RopeAttention(dim, num_heads, grid=rope_grid, scale=rope_scale, theta=theta)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        y = self.norm1(x)
        if self.window:
            y = window_unpartition(self.attn(window_partition(y, self.window)), self.window, h, w)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class PerceptionViT(nn.Module):
    """``B x 3 x S x S`` normalised image -> ``B x D x g x g`` tokens of the last block (no final norm)."""

    def __init__(self, config: PerceptionViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c.embed_dim, c.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.pretrain_grid ** 2 + 1, c.embed_dim))
        self.ln_pre = nn.LayerNorm(c.embed_dim, eps=1e-5)
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_hidden, grid=c.grid, theta=c.rope_theta,
                  window=0 if i in c.global_att_blocks else c.window_size)
            for i in range(c.depth))

    def tiled_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The pretraining table without its cls row, tiled (not interpolated) to ``1 x h x w x D``."""
        n = self.config.pretrain_grid
        table = self.pos_embed[:, 1:].reshape(1, n, n, -1)
        reps_h, reps_w = -(-h // n), -(-w // n)
        return table.tile(1, reps_h, reps_w, 1)[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.ln_pre(x + self.tiled_pos_embed(x.shape[1], x.shape[2]))
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)
