"""Sine position encodings of SAM 2 (spec/sam2.md section 3): the 2-D one of the neck and the memory
encoder, and the 1-D one of the object pointers' temporal positions (section 8.3)."""
from __future__ import annotations

import math

import torch


def sine_position_encoding_2d(h: int, w: int, num_pos_feats: int, *, temperature: float = 10000.0,
                              device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised sine encoding of an ``h x w`` grid -> ``num_pos_feats x h x w``.

    ``num_pos_feats // 2`` channels per axis, y half first, sin/cos interleaved within each half;
    positions are ``(i + 1) / (n + 1e-6) * 2 pi`` (the reference's ``normalize=True``).
    """
    feats = num_pos_feats // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)[None, :].expand(h, w)
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = torch.arange(feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / feats)
    pos_x = x[:, :, None] / dim_t
    pos_y = y[:, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[:, :, 0::2].sin(), pos_y[:, :, 1::2].cos()), dim=3).flatten(2)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).to(dtype)


def sine_position_encoding_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """``N`` normalised positions -> ``N x dim``: ``[sin(p / tau_k), cos(p / tau_k)]`` (not interleaved),
    ``tau_k = temperature ** (2 * (k // 2) / (dim // 2))`` for ``k < dim // 2``."""
    half = dim // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    pos = positions.float()[:, None] / dim_t
    return torch.cat([pos.sin(), pos.cos()], dim=-1)
