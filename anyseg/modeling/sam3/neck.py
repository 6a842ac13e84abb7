"""SAM 3's neck (spec/sam3.md section 4): from the ViT's ``g x g`` map, levels at 4x, 2x, 1x and
0.5x, each ending in a 1x1 then a 3x3 convolution to the detector width; the last ``scalp`` levels
are dropped. Also the sine position encoding of every kept level."""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch
from torch import nn

from ..sam2.position import sine_position_encoding_2d


class NeckLevel(nn.Module):
    """One level; the keys are the reference's (``dconv_2x2_0``, ``dconv_2x2_1`` / ``dconv_2x2`` / ``pool``)."""

    def __init__(self, in_dim: int, out_dim: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        if scale == 4.0:
            self.dconv_2x2_0 = nn.ConvTranspose2d(in_dim, in_dim // 2, 2, stride=2)
            self.act = nn.GELU()
            self.dconv_2x2_1 = nn.ConvTranspose2d(in_dim // 2, in_dim // 4, 2, stride=2)
            width = in_dim // 4
        elif scale == 2.0:
            self.dconv_2x2 = nn.ConvTranspose2d(in_dim, in_dim // 2, 2, stride=2)
            width = in_dim // 2
        elif scale == 1.0:
            width = in_dim
        elif scale == 0.5:
            self.pool = nn.MaxPool2d(2, stride=2)
            width = in_dim
        else:
            raise ValueError(f"unsupported neck scale {scale}")
        self.conv_1x1 = nn.Conv2d(width, out_dim, 1)
        self.conv_3x3 = nn.Conv2d(out_dim, out_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 4.0:
            x = self.dconv_2x2_1(self.act(self.dconv_2x2_0(x)))
        elif self.scale == 2.0:
            x = self.dconv_2x2(x)
        elif self.scale == 0.5:
            x = self.pool(x)
        return self.conv_3x3(self.conv_1x1(x))


class VisionFeatures(NamedTuple):
    """The kept levels, finest first (``B x d x h x w``: 288, 144, 72 for the public model), and their
    sine position encodings (same shapes)."""

    fpn: List[torch.Tensor]
    pos: List[torch.Tensor]

    @property
    def vision_features(self) -> torch.Tensor:
        """The coarsest kept level (72 x 72), which the detector attends to."""
        return self.fpn[-1]


class VisionBackbone(nn.Module):
    """The ViT (``trunk``) and the neck levels (``convs``): image -> :class:`VisionFeatures`."""

    def __init__(self, trunk: nn.Module, *, in_dim: int, out_dim: int, scales: Sequence[float], scalp: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.convs = nn.ModuleList(NeckLevel(in_dim, out_dim, s) for s in scales)
        self.scalp = scalp
        self.out_dim = out_dim

    def forward(self, image: torch.Tensor) -> VisionFeatures:
        """image: ``B x 3 x S x S`` normalised."""
        return self.neck(self.trunk(image))

    def neck(self, x: torch.Tensor) -> VisionFeatures:
        """x: the trunk's ``B x D x g x g`` map."""
        kept = len(self.convs) - self.scalp
        # The dropped levels change nothing downstream, so they are not computed.
        fpn = [conv(x) for conv in list(self.convs)[:kept]]
        pos = [sine_position_encoding_2d(f.shape[-2], f.shape[-1], self.out_dim, device=f.device, dtype=f.dtype)
               [None].expand(f.shape[0], -1, -1, -1) for f in fpn]
        return VisionFeatures(fpn, pos)
