"""Sine encodings of scalar coordinates used by the geometry encoder and the decoder (spec/sam3.md
sections 7 and 9)."""
from __future__ import annotations

import math

import torch


def sine_scalar(v: torch.Tensor, channels: int, temperature: float = 10000.0) -> torch.Tensor:
    """``... `` values in [0, 1] -> ``... x channels``: ``2 pi v / t_k``, sin at even k, cos at odd k,
    ``t_k = temperature ** (2 floor(k/2) / channels)``."""
    dim_t = torch.arange(channels, dtype=torch.float32, device=v.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / channels)
    pos = (v.float() * (2 * math.pi))[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2).to(v.dtype)


def sine_boxes(boxes: torch.Tensor, channels: int) -> torch.Tensor:
    """``... x 4`` cxcywh -> ``... x 4*channels``: encodings of y, x, w, h in that order (decoder queries)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.cat([sine_scalar(cy, channels), sine_scalar(cx, channels),
                      sine_scalar(w, channels), sine_scalar(h, channels)], dim=-1)
