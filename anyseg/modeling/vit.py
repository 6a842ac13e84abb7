"""ViT image encoder of SAM: patch embedding, windowed / global attention with decomposed relative
positions, and a convolutional neck down to 256 channels.

Tensors inside the trunk are channels-last: ``B x H x W x C`` on the 64 x 64 token grid.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ViTConfig
from .common import LayerNorm2d, MLPBlock


def resize_relative_table(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """A stored ``L x d`` relative-position table linearly resampled to ``length x d``."""
    return F.interpolate(
        rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear"
    ).reshape(-1, length).permute(1, 0)


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Per (query, key) pair along one axis, the relative-position vector: ``q_size x k_size x d``.

    A stored table whose length is not ``2 * max(q, k) - 1`` is linearly resized first.
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = resize_relative_table(rel_pos, length)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    index = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[index.long()]


def relative_position_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two decomposed relative-position terms for unscaled queries ``q`` (``B x HW x d``):
    ``B x HW x h x 1`` (``q . Rh[qi-ki]`` per key row) and ``B x HW x 1 x w`` (``q . Rw[qj-kj]`` per key
    column); their broadcast sum, reshaped to ``B x HW x HW``, is the bias."""
    h, w = size
    table_h = relative_position_table(h, h, rel_pos_h)
    table_w = relative_position_table(w, w, rel_pos_w)
    b, n, d = q.shape
    r_q = q.reshape(b, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, table_h).reshape(b, n, h, 1)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, table_w).reshape(b, n, 1, w)
    return rel_h, rel_w


def relative_position_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: Tuple[int, int]
) -> torch.Tensor:
    """Decomposed relative-position logits for unscaled queries ``q`` (``B x HW x d``).

    Returns ``B x HW x HW``: for query (qi, qj) and key (ki, kj), ``q . Rh[qi-ki] + q . Rw[qj-kj]``.
    """
    rel_h, rel_w = relative_position_terms(q, rel_pos_h, rel_pos_w, size)
    b, n = q.shape[:2]
    return (rel_h + rel_w).reshape(b, n, n)


class Attention(nn.Module):
    """Multi-head self-attention over a ``B x H x W x C`` grid with decomposed relative positions.

    ``fused`` (a fast path, off by default) runs PyTorch's scaled_dot_product_attention with the
    relative-position terms passed as an additive bias instead of the explicit softmax; global
    attention does so in blocks of ``query_chunk`` queries, so the bias is never built whole.
    """

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool, use_rel_pos: bool, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.fused = False

    # Fused global attention runs in blocks of this many queries: the relative-position bias of a
    # block (heads x query_chunk x HW) stays small, instead of heads x HW x HW (805 MB for ViT-B).
    query_chunk = 512

    def _fused_chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """SDPA over query blocks with the decomposed relative-position bias built per block; the
        same arithmetic as the unchunked fused path (each query row is independent)."""
        n, d = q.shape[1], q.shape[2]
        rel_h, rel_w = relative_position_terms(q, self.rel_pos_h, self.rel_pos_w, size)
        # SDPA's fused kernels take 4-D (batch, heads, tokens, dim) inputs only; 3-D ones fall back to
        # the unfused math kernel on GPUs.
        heads = self.num_heads
        q4, k4, v4 = (t.view(-1, heads, n, d) for t in (q, k, v))
        out = torch.empty_like(q4)
        for start in range(0, n, self.query_chunk):
            stop = min(n, start + self.query_chunk)
            bias = (rel_h[:, start:stop] + rel_w[:, start:stop]).reshape(-1, heads, stop - start, n)
            out[:, :, start:stop] = F.scaled_dot_product_attention(q4[:, :, start:stop], k4, v4, attn_mask=bias,
                                                                   scale=self.scale)
        return out.view(-1, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)
        chunked = self.fused and self.use_rel_pos and n > self.query_chunk
        bias = None
        if self.use_rel_pos and not chunked:
            bias = relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        if chunked:
            out = self._fused_chunked(q, k, v, (h, w))
        elif self.fused:  # 4-D views (see _fused_chunked)
            q4, k4, v4 = (t.view(b, self.num_heads, n, -1) for t in (q, k, v))
            bias4 = None if bias is None else bias.view(b, self.num_heads, n, n)
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias4, scale=self.scale)
            out = out.reshape(b * self.num_heads, n, -1)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            out = attn.softmax(dim=-1) @ v
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def window_partition(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """``B x H x W x C`` -> ``(B * nWin) x window x window x C``, zero-padding bottom/right first."""
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: Tuple[int, int], size: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, cropping the padding away."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous() if (hp > h or wp > w) else x


class Block(nn.Module):
    """Pre-norm transformer block; ``window == 0`` means global attention."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, qkv_bias: bool, use_rel_pos: bool,
                 window: int, grid: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                              grid=window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            size = (x.shape[1], x.shape[2])
            x, padded = window_partition(x, self.window)
            x = self.attn(x)
            x = window_unpartition(x, self.window, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def build_neck(in_dim: int, out_dim: int) -> nn.Sequential:
    """Keys ``neck.0..3``: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False),
        LayerNorm2d(out_dim),
        nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_dim),
    )


class ImageEncoderViT(nn.Module):
    """``B x 3 x S x S`` normalised, padded image -> ``B x 256 x S/16 x S/16`` embedding."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.img_size = config.img_size
        grid = config.grid_size
        self.patch_embed = PatchEmbed(patch_size=config.patch_size, in_chans=config.in_chans,
                                      embed_dim=config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                  qkv_bias=config.qkv_bias, use_rel_pos=config.use_rel_pos,
                  window=0 if i in config.global_attn_indexes else config.window_size, grid=grid)
            for i in range(config.depth)
        )
        self.neck = build_neck(config.embed_dim, config.out_chans)

    def forward(self, x: torch.Tensor, return_interm: bool = False):
        """With ``return_interm`` also the output of the first global-attention block,
        ``B x g x g x embed_dim`` (channels last): HQ-SAM's early feature."""
        x = self.patch_embed(x) + self.pos_embed
        interm = None
        first_global = self.config.global_attn_indexes[0] if self.config.global_attn_indexes else None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if return_interm and i == first_global:
                interm = x
        out = self.neck(x.permute(0, 3, 1, 2))
        return (out, interm) if return_interm else out
