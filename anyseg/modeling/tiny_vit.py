"""TinyViT image encoder of MobileSAM (``vit_t``).

Stage 0 is convolutional (MBConv blocks on ``B x C x H x W``); stages 1..3 are transformer stages on
tokens ``B x L x C`` over a known ``res x res`` grid, each block doing windowed attention with learned
per-offset biases, a depthwise 3x3 "local" convolution and an MLP. PatchMerging between stages turns
maps into tokens and halves the grid (or keeps it, see ``TinyViTConfig.strides``).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TinyViTConfig
from .vit import build_neck


class ConvBN(nn.Sequential):
    """Conv2d without bias (key ``c``) followed by BatchNorm2d (key ``bn``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_ch))
        # Fast path (off by default): in eval mode, fold the BatchNorm statistics into the convolution
        # and run one conv2d. Same math reordered; the stored parameters are untouched.
        self.fold_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fold_bn and not self.training):
            return super().forward(x)
        conv, bn = self.c, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
        bias = (bn.bias - bn.running_mean * scale).to(conv.weight.dtype)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 conv+BN layers with GELU between: ``B x 3 x S x S -> B x C x S/4 x S/4``."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, 1)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)


class PatchMerging(nn.Module):
    """Maps or ``B x L x C`` tokens on a ``res x res`` grid -> ``B x L' x C_out`` tokens."""

    def __init__(self, *, resolution: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            b, _, c = x.shape
            x = x.view(b, self.resolution, self.resolution, c).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


def offset_index(window: int) -> torch.Tensor:
    """``N x N`` (N = window**2) index of the bias for each (query, key) pair in a window.

    Offsets (|d_row|, |d_col|) are numbered in first-seen order, scanning queries then keys row-major.
    """
    points = list(itertools.product(range(window), range(window)))
    numbering: dict = {}
    index = []
    for p in points:
        for q in points:
            off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
            if off not in numbering:
                numbering[off] = len(numbering)
            index.append(numbering[off])
    n = len(points)
    return torch.tensor(index, dtype=torch.long).view(n, n)


class Attention(nn.Module):
    """Windowed attention on ``B x N x C`` tokens: own LayerNorm, head-major qkv, per-offset bias."""

    def __init__(self, dim: int, *, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        index = offset_index(window)
        n_offsets = int(index.max()) + 1
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n_offsets))
        self.register_buffer("attention_bias_idxs", index, persistent=False)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x).view(b, n, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.split(self.key_dim, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        bias = self.attention_biases[:, self.attention_bias_idxs]
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale + bias
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), depthwise local conv, MLP (residual) on ``B x L x C``."""

    def __init__(self, dim: int, *, resolution: int, num_heads: int, window: int, mlp_ratio: float,
                 local_conv_size: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = Attention(dim, num_heads=num_heads, window=window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        pad = local_conv_size // 2
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, pad, groups=dim)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, l, c = x.shape
        res, ws = self.resolution, self.window
        if res == ws:
            return self.attn(x)
        x = x.view(b, res, res, c)
        pad = (ws - res % ws) % ws
        if pad:
            # Padding tokens are zeros before the attention's own LayerNorm and are not masked.
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        p = res + pad
        nw = p // ws
        x = x.view(b, nw, ws, nw, ws, c).transpose(2, 3).reshape(b * nw * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nw, nw, ws, ws, c).transpose(2, 3).reshape(b, p, p, c)
        if pad:
            x = x[:, :res, :res].contiguous()
        return x.view(b, l, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, c = x.shape
        x = x + self._windowed_attention(x)
        x = x.transpose(1, 2).reshape(b, c, self.resolution, self.resolution)
        x = self.local_conv(x)
        x = x.view(b, c, l).transpose(1, 2)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    def __init__(self, dim: int, *, depth: int, expand_ratio: float, downsample: Optional[PatchMerging]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class BasicLayer(nn.Module):
    def __init__(self, dim: int, *, resolution: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 local_conv_size: int, downsample: Optional[PatchMerging]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution=resolution, num_heads=num_heads, window=window, mlp_ratio=mlp_ratio,
                         local_conv_size=local_conv_size)
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """``B x 3 x S x S`` normalised, padded image -> ``B x 256 x g x g`` embedding (g = 64 for S = 1024)."""

    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.config = config
        self.img_size = config.img_size
        dims, res, strides = config.embed_dims, config.resolutions(), config.strides()
        n = len(dims)
        self.patch_embed = PatchEmbed(config.in_chans, dims[0])
        layers = []
        for i in range(n):
            merge = None
            if i < n - 1:
                merge = PatchMerging(resolution=res[i], dim=dims[i], out_dim=dims[i + 1], stride=strides[i])
            if i == 0:
                layers.append(ConvLayer(dims[0], depth=config.depths[0], expand_ratio=config.mbconv_expand_ratio,
                                        downsample=merge))
            else:
                layers.append(BasicLayer(dims[i], resolution=res[i], depth=config.depths[i],
                                         num_heads=config.num_heads[i], window=config.window_sizes[i],
                                         mlp_ratio=config.mlp_ratio, local_conv_size=config.local_conv_size,
                                         downsample=merge))
        self.layers = nn.ModuleList(layers)
        if config.num_classes:
            self.norm_head = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], config.num_classes)
        self.neck = build_neck(dims[-1], config.out_chans)
        self.grid = res[-1]

    def forward(self, x: torch.Tensor, return_interm: bool = False):
        """With ``return_interm`` also the output of ``layers[1]`` (including its PatchMerging),
        ``B x r x r x C`` channels last (64 x 64 x 160 for MobileSAM): HQ-SAM's early feature."""
        x = self.patch_embed(x)
        interm = None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if return_interm and i == 1:
                side = math.isqrt(int(x.shape[1]))  # int(): a constant when traced for ONNX
                interm = x.view(x.shape[0], side, side, x.shape[2])
        b, _, c = x.shape
        x = x.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2)
        out = self.neck(x)
        return (out, interm) if return_interm else out
