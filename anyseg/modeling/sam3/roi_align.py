"""RoIAlign (Mask R-CNN's, ``aligned=False``, adaptive sampling) written out for the geometry encoder.

Each output bin averages ``ceil(roi_h / out) x ceil(roi_w / out)`` bilinear samples. Bilinear
interpolation is separable, so one box is two small matrices: ``Wy (out*gh x H) @ F @ Wx^T``,
followed by a mean over each bin's samples.
"""
from __future__ import annotations

import math

import torch


def _axis_weights(start: float, length: float, out: int, size: int, *, device, dtype) -> torch.Tensor:
    """``out * g x size`` interpolation weights for the samples of one box along one axis."""
    length = max(length, 1.0)
    grid = int(math.ceil(length / out))
    bin_size = length / out
    idx = torch.arange(out * grid, dtype=torch.float64)
    coord = start + torch.div(idx, grid, rounding_mode="floor") * bin_size + (idx % grid + 0.5) * bin_size / grid
    coord = coord.to(torch.float32).to(torch.float64)
    valid = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0)
    low = coord.floor().long()
    top = low >= size - 1
    low = torch.where(top, torch.full_like(low, size - 1), low)
    high = torch.where(top, low, low + 1)
    coord = torch.where(top, low.double(), coord)
    frac = coord - low
    weights = torch.zeros(out * grid, size, dtype=torch.float64)
    rows = torch.arange(out * grid)
    weights[rows, low] += (1 - frac) * valid
    weights[rows, high] += frac * valid
    return weights.to(device=device, dtype=dtype), grid


def roi_align(features: torch.Tensor, boxes: torch.Tensor, output_size: int) -> torch.Tensor:
    """features: ``C x H x W`` (one image); boxes: ``N x 4`` XYXY in feature pixels (spatial scale 1).
    Returns ``N x C x out x out``."""
    c, h, w = features.shape
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        wy, gy = _axis_weights(y0, y1 - y0, output_size, h, device=features.device, dtype=features.dtype)
        wx, gx = _axis_weights(x0, x1 - x0, output_size, w, device=features.device, dtype=features.dtype)
        samples = wy @ features @ wx.T  # C x out*gy x out*gx
        out.append(samples.view(c, output_size, gy, output_size, gx).mean(dim=(2, 4)))
    if not out:
        return features.new_zeros(0, c, output_size, output_size)
    return torch.stack(out)
