"""FPN neck of SAM 2 (spec/sam2.md section 3) and the image encoder that wires trunk and neck."""
from __future__ import annotations

from typing import List, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config_sam2 import NeckConfig
from .hiera import Hiera
from .position import sine_position_encoding_2d


class _Lateral(nn.Module):
    """A 1 x 1 lateral convolution (key ``convs.k.conv``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FpnNeck(nn.Module):
    """Laterals to ``d_model`` channels, top-down (nearest x2, summed) for ``fpn_top_down_levels``."""

    def __init__(self, config: NeckConfig) -> None:
        super().__init__()
        self.config = config
        self.convs = nn.ModuleList(_Lateral(c, config.d_model) for c in config.backbone_channel_list)
        if config.fpn_interp_model != "nearest":
            raise ValueError(f"only nearest top-down interpolation is supported, got {config.fpn_interp_model!r}")

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Trunk outputs (stride 4 first) -> FPN levels, stride 4 first, each ``B x d_model x h x w``."""
        n = len(self.convs) - 1
        out: List[torch.Tensor] = [None] * len(self.convs)  # type: ignore[list-item]
        prev = None
        for i in range(n, -1, -1):
            lateral = self.convs[n - i](xs[i])
            if i in self.config.fpn_top_down_levels and prev is not None:
                top_down = F.interpolate(prev.to(torch.float32), scale_factor=2.0, mode="nearest")
                prev = lateral + top_down
            else:
                prev = lateral
            out[i] = prev
        return out


class ImageFeatures(NamedTuple):
    """What SAM 2's image encoder hands on (after ``scalp``).

    levels: FPN maps, stride 4 first (``B x 256 x 256 x 256``, ``... x 128 x 128``, ``... x 64 x 64``
    for a 1024 input); the last one is the vision feature (the image embedding's place).
    """

    levels: List[torch.Tensor]

    @property
    def vision(self) -> torch.Tensor:
        return self.levels[-1]


class Sam2ImageEncoder(nn.Module):
    """Trunk + neck; keys ``image_encoder.trunk.*`` and ``image_encoder.neck.*``."""

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        levels = self.neck(self.trunk(x))
        if self.scalp > 0:
            levels = levels[: -self.scalp]
        return ImageFeatures(levels)


def vision_position_encoding(h: int, w: int, dim: int = 256, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The neck's sine encoding of an ``h x w`` level: ``1 x dim x h x w`` (the same for every image)."""
    return sine_position_encoding_2d(h, w, dim, device=device, dtype=dtype)[None]
