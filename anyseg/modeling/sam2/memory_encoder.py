"""SAM 2 memory encoder (spec/sam2.md section 6, keys ``memory_encoder.*``).

A frame's raw stride-16 feature and a 1024 x 1024 mask map are fused into a 64-channel memory:
the mask is downsampled by strided convolutions to the feature grid, added to a projection of the
feature, mixed by ConvNeXt blocks and projected to ``out_dim``. The memory's position encoding is the
2-D sine encoding of its grid, the same for every frame.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ...config_sam2 import MemoryEncoderConfig
from ..common import LayerNorm2d
from .position import sine_position_encoding_2d


class MaskDownSampler(nn.Module):
    """``B x 1 x S x S`` mask -> ``B x embed_dim x S/stride x S/stride``.

    ``log2(total_stride)`` times [Conv2d k3 s2 p1 -> LayerNorm2d -> GELU], each multiplying the channels
    by 4 (1 -> 4 -> 16 -> 64 -> 256 for stride 16), then a 1x1 Conv to ``embed_dim``. The modules sit in
    one ``encoder`` Sequential so that the public keys (``encoder.0``, ``.1``, ``.3``, ..., ``.12``) load as is.
    """

    def __init__(self, *, embed_dim: int = 256, total_stride: int = 16, stride: int = 2,
                 kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        num_layers = int(round(math.log(total_stride) / math.log(stride)))
        if stride ** num_layers != total_stride:
            raise ValueError(f"mask_downsample_stride {total_stride} is not a power of {stride}")
        layers = []
        in_ch = 1
        for _ in range(num_layers):
            out_ch = in_ch * stride * stride
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding),
                       LayerNorm2d(out_ch), nn.GELU()]
            in_ch = out_ch
        layers.append(nn.Conv2d(in_ch, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise conv -> LayerNorm2d -> (channels last) Linear 4x -> GELU -> Linear ->
    scale by ``gamma`` -> residual. ``B x dim x H x W`` in and out."""

    def __init__(self, dim: int, *, kernel_size: int = 7, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x))
        y = y.permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """A stack of :class:`CXBlock` (keys ``layers.i``)."""

    def __init__(self, dim: int, num_layers: int, *, kernel_size: int = 7) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim, kernel_size=kernel_size) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Frame feature + mask -> memory features and their position encoding.

    Keys: ``mask_downsampler.encoder.*``, ``pix_feat_proj``, ``fuser.layers.i.*``, ``out_proj``.
    The 2.1 ``no_obj_embed_spatial`` term is not applied here (it belongs to the model, which knows the
    object score).
    """

    def __init__(self, config: MemoryEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.mask_downsampler = MaskDownSampler(embed_dim=config.in_dim,
                                                total_stride=config.mask_downsample_stride)
        self.pix_feat_proj = nn.Conv2d(config.in_dim, config.in_dim, kernel_size=1)
        self.fuser = Fuser(config.in_dim, config.fuser_num_layers, kernel_size=config.kernel_size)
        # Without a change of width the reference has no projection (and no key).
        self.out_proj = (nn.Conv2d(config.in_dim, config.out_dim, kernel_size=1)
                         if config.out_dim != config.in_dim else nn.Identity())

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode one memory.

        Args:
            pix_feat: ``B x in_dim x h x w`` raw frame feature (no ``no_mem_embed``), e.g. ``B x 256 x 64 x 64``.
            masks: ``B x 1 x (h*stride) x (w*stride)`` mask map over the model frame, e.g. ``B x 1 x 1024 x 1024``,
                already scaled by the caller (spec 8.4) when ``skip_mask_sigmoid`` is True; raw logits
                to squash with a sigmoid otherwise.
            skip_mask_sigmoid: the reference's flag; SAM 2 always passes True.

        Returns:
            ``(features, pos)``: ``B x out_dim x h x w`` memory features and their sine position
            encoding of the same shape (float32 unless the features are of another dtype).
        """
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        m = self.mask_downsampler(masks)
        if m.shape[-2:] != pix_feat.shape[-2:]:
            raise ValueError(f"mask map {tuple(masks.shape)} downsamples to {tuple(m.shape[-2:])}, "
                             f"but the frame feature is {tuple(pix_feat.shape[-2:])}")
        x = self.pix_feat_proj(pix_feat.to(m.device)) + m
        x = self.fuser(x)
        x = self.out_proj(x)
        b, c, h, w = x.shape
        pos = sine_position_encoding_2d(h, w, c, device=x.device, dtype=x.dtype)
        return x, pos[None].repeat(b, 1, 1, 1)
