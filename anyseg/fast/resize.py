"""Low-res mask logits -> original frame in one banded resampling instead of two bilinear resizes.

The faithful post-processing (``Sam.postprocess_masks``) upsamples ``L x L`` logits (L = 256) to the
``S x S`` model frame (S = 1024), crops the ``h x w`` resized image and resizes that to ``H x W``. Both
steps are separable linear maps, so their composition is one ``H x L`` matrix on the rows and one
``W x L`` matrix on the columns, each banded (an output pixel depends on at most 3 low-res rows and 3
columns). :class:`MaskResizer` builds the two matrices once per geometry (by resizing identity matrices
with ``F.interpolate`` itself, in float64) and applies them as small dense blocks: output positions are
grouped in blocks of ``block`` and each block reads only the input window it needs. The result equals
the two-step resize up to float32 rounding, never builds the ``S x S`` intermediate, and costs a few
multiply-adds per output pixel.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``n_out x n_in`` float64 matrix of ``F.interpolate(..., mode="bilinear", align_corners=False)``
    along one axis (size given, no antialiasing)."""
    eye = torch.eye(n_in, dtype=torch.float64).view(1, n_in, n_in, 1)
    out = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)
    return out.view(n_in, n_out).t().contiguous()


def composed_matrix(low: int, side: int, crop: int, out: int) -> torch.Tensor:
    """``out x low``: upsample ``low -> side``, keep the first ``crop``, resize ``crop -> out``."""
    up = bilinear_matrix(low, side)[:crop]
    return bilinear_matrix(crop, out) @ up


class _Banded:
    """A banded ``n_out x n_in`` matrix applied along the last axis in blocks of ``block`` outputs."""

    def __init__(self, matrix: torch.Tensor, block: int) -> None:
        n_out, n_in = matrix.shape
        nz = matrix != 0
        any_nz = nz.any(dim=1)
        ar = torch.arange(n_in)
        first = torch.where(nz, ar, n_in).min(dim=1).values
        last = torch.where(nz, ar, -1).max(dim=1).values
        first = torch.where(any_nz, first, 0)
        last = torch.where(any_nz, last, 0)
        n_blocks = -(-n_out // block)
        pad = n_blocks * block - n_out
        first = torch.cat([first, first[-1:].expand(pad)])
        last = torch.cat([last, last[-1:].expand(pad)])
        mat = torch.cat([matrix, matrix.new_zeros(pad, n_in)])
        starts = first.view(n_blocks, block).min(dim=1).values
        ends = last.view(n_blocks, block).max(dim=1).values
        width = int((ends - starts).max()) + 1
        width = min(width, n_in)
        starts = torch.clamp(starts, max=n_in - width)
        index = starts[:, None] + torch.arange(width)[None, :]  # n_blocks x width
        rows = mat.view(n_blocks, block, n_in)
        weights = torch.gather(rows, 2, index[:, None, :].expand(n_blocks, block, width))  # nb x block x width
        # Every nonzero must fall inside its block's window.
        if not torch.allclose(weights.sum(-1), rows.sum(-1), atol=1e-9):
            raise RuntimeError("band window does not cover the resampling weights")
        self.n_out = n_out
        self.index = index.reshape(-1)
        self.weights = weights.transpose(1, 2).to(torch.float32).contiguous()  # nb x width x block
        self.n_blocks, self.width, self.block = n_blocks, width, block
        self._on = {}

    def _tensors(self, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """index, weights (``nb x width x block``) and their ``nb x block x width`` transpose, on device."""
        key = (str(device), dtype)
        if key not in self._on:
            weights = self.weights.to(device=device, dtype=dtype)
            self._on[key] = (self.index.to(device), weights, weights.transpose(1, 2).contiguous())
        return self._on[key]

    def along_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``... x n_in x C`` -> ``... x n_out x C``: the same map along the second-last axis, where
        gathering whole rows is cheap, so nothing is transposed."""
        index, _, weights_t = self._tensors(x.device, x.dtype)
        lead, c = x.shape[:-2], x.shape[-1]
        x = x.reshape(-1, x.shape[-2], c)
        g = x.index_select(1, index).view(x.shape[0], self.n_blocks, self.width, c)  # m x nb x width x C
        y = torch.matmul(weights_t, g)  # m x nb x block x C
        return y.view(x.shape[0], self.n_blocks * self.block, c)[:, : self.n_out].reshape(*lead, self.n_out, c)

    def __call__(self, x: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        """``... x n_in`` -> ``... x n_out`` (booleans ``> threshold`` when given: compared before the
        blocks are put back in order, so that the reordering copy moves bytes instead of floats)."""
        index, weights, _ = self._tensors(x.device, x.dtype)
        lead = x.shape[:-1]
        g = x.reshape(-1, x.shape[-1]).index_select(1, index)  # R x (nb width)
        g = g.view(-1, self.n_blocks, self.width).transpose(0, 1)  # nb x R x width
        y = torch.bmm(g, weights)  # nb x R x block
        if threshold is not None:
            y = y > threshold
        y = y.transpose(0, 1).reshape(-1, self.n_blocks * self.block)[:, : self.n_out]
        return y.reshape(*lead, self.n_out)


class MaskResizer:
    """Map ``... x L x L`` low-res logits to the original ``H x W`` frame (see the module docstring).

    Args:
        low: low-res side L (256). side: model input side S (1024).
        input_size: ``(h, w)`` of the resized image inside the ``S x S`` frame.
        original_size: ``(H, W)``.
    """

    def __init__(self, low: int, side: int, input_size: Tuple[int, int], original_size: Tuple[int, int],
                 block: int = 32) -> None:
        (h, w), (oh, ow) = input_size, original_size
        if not (0 < h <= side and 0 < w <= side and oh > 0 and ow > 0):
            raise ValueError(f"bad sizes: input {input_size} inside {side} x {side}, original {original_size}")
        self._set(low, composed_matrix(low, side, h, oh), composed_matrix(low, side, w, ow), block)

    def _set(self, low: int, rows: torch.Tensor, cols: torch.Tensor, block: int) -> None:
        self.rows = _Banded(rows, block)
        self.cols = _Banded(cols, block)
        self.low = low
        self.original_size = (rows.shape[0], cols.shape[0])

    @classmethod
    def direct(cls, low: int, original_size: Tuple[int, int], block: int = 32) -> "MaskResizer":
        """One bilinear resize (``align_corners=False``) of ``L x L`` logits straight to ``H x W``, as
        SAM 2 post-processes its masks (no padding to crop)."""
        oh, ow = original_size
        if not (low > 0 and oh > 0 and ow > 0):
            raise ValueError(f"bad sizes: low-res side {low}, original {original_size}")
        resizer = cls.__new__(cls)
        resizer._set(low, bilinear_matrix(low, oh), bilinear_matrix(low, ow), block)
        return resizer

    def __call__(self, logits: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        """``... x L x L`` float logits -> ``... x H x W`` logits (same dtype), or with ``threshold`` the
        boolean masks ``logits > threshold`` (the same as thresholding the logits afterwards)."""
        if logits.shape[-2:] != (self.low, self.low):
            raise ValueError(f"expected ... x {self.low} x {self.low} logits, got {tuple(logits.shape)}")
        return self.cols(self.rows.along_rows(logits), threshold)  # ... x H x L, then ... x H x W


@lru_cache(maxsize=32)
def get_resizer(low: int, side: int, input_size: Tuple[int, int], original_size: Tuple[int, int]) -> MaskResizer:
    """A cached :class:`MaskResizer` for one geometry."""
    return MaskResizer(low, side, tuple(input_size), tuple(original_size))


@lru_cache(maxsize=32)
def get_direct_resizer(low: int, original_size: Tuple[int, int]) -> MaskResizer:
    """A cached :meth:`MaskResizer.direct` for one geometry."""
    return MaskResizer.direct(low, tuple(original_size))
