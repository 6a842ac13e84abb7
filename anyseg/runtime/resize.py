"""Antialiased bilinear resize of float images in numpy, the arithmetic of PyTorch's CPU kernel.

``resize_bilinear_aa(x, (h, w))`` equals ``torch.nn.functional.interpolate(x, (h, w), mode="bilinear",
align_corners=False, antialias=True)`` on a float32 ``... x H x W`` array to float32 rounding (SAM 2's
image preprocessing, spec/sam2.md section 1), without torch. It follows the kernel step by step: the
same float32 weights (a triangle filter stretched by the scale when shrinking, each output's taps
normalised to sum 1), the width pass before the height pass, and each output accumulated tap by tap
in float32 in the order of torch's compiled x86-64 kernel: the first product rounded, then whole
groups of four taps as rounded products added one by one, then the remaining taps as fused
multiply-adds (product and sum rounded once). That reproduces torch's float32 bits on the machines
measured (``tests/test_sam2_onnx.py`` compares the two); a build that contracts differently differs
in the last bit or two. (Inputs one pixel wide are the exception: torch 2.x mis-resizes them along
the other axis.)
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["aa_weights", "resize_bilinear_aa"]

_F = np.float32


def aa_weights(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps of each output pixel along one axis: ``index out_size x T`` (int64, clipped into the input),
    ``weight out_size x T`` (float32; zero beyond a pixel's own taps) and the number of its own taps
    ``out_size`` (int64; the kernel's loop length, which may end in zero weights)."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    # Mirrors aten/src/ATen/native/cpu/UpSampleKernel.cpp (_compute_indices_min_size_weights_aa) with
    # scalar_t = float: C++ mixes float and double exactly as written below.
    scale = _F(_F(in_size) / _F(out_size))
    support = _F(scale) if scale >= 1.0 else _F(1.0)  # interp_size 2 * 0.5 (* scale)
    taps = int(np.ceil(support)) * 2 + 1
    invscale = _F(1.0 / float(scale)) if scale >= 1.0 else _F(1.0)
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), _F)
    sizes = np.zeros(out_size, np.int64)
    for i in range(out_size):
        center = _F(float(scale) * (i + 0.5))
        xmin = max(int(float(_F(center - support)) + 0.5), 0)
        xsize = min(int(float(_F(center + support)) + 0.5), in_size) - xmin
        xsize = min(max(xsize, 0), taps)
        js = np.arange(xsize)
        # (j + xmin) - center is int64 - float: float arithmetic; + 0.5 and * invscale in double.
        d = (_F(js + xmin) - center).astype(np.float64)
        arg = ((d + 0.5) * float(invscale)).astype(_F)
        w = np.maximum(_F(1.0) - np.abs(arg), _F(0.0)).astype(_F)
        w = np.where(np.abs(arg) < 1.0, w, _F(0.0)).astype(_F)
        total = _F(0.0)
        for v in w:
            total = _F(total + v)
        if total != 0.0:
            w = (w / total).astype(_F)
        index[i, :xsize] = js + xmin
        index[i, xsize:] = min(xmin, in_size - 1)
        weight[i, :xsize] = w
        sizes[i] = xsize
    return index, weight, sizes


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    index, weight, sizes = aa_weights(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    grouped = (4 * ((np.maximum(sizes, 1) - 1) // 4)).reshape(shape)
    out = None
    for j in range(index.shape[1]):
        # float32 * float32 is exact in float64: rounding product + sum once is a fused multiply-add.
        term = np.take(x, index[:, j], axis=axis).astype(np.float64) * weight[:, j].reshape(shape)
        if out is None:
            out = term.astype(_F)
            continue
        fused = (out + term).astype(_F)
        out = fused if j > grouped.max() else np.where(j <= grouped, out + term.astype(_F), fused)
    return out


def resize_bilinear_aa(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``... x H x W`` float image -> ``... x h x w`` float32, antialiased bilinear (half-pixel centres).

    Shrinking averages over the footprint of each output pixel (like PIL and torch with
    ``antialias=True``); enlarging is plain bilinear interpolation with edge clamping.
    """
    x = np.asarray(x, dtype=_F)
    if x.ndim < 2:
        raise ValueError(f"expected an image of shape ... x H x W, got shape {x.shape}")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"output size must be positive, got {size!r}")
    return np.ascontiguousarray(_resize_axis(_resize_axis(x, w, x.ndim - 1), h, x.ndim - 2), dtype=_F)
