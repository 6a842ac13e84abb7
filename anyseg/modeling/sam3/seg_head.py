"""The segmentation head (spec/sam3.md section 10): the fused image tokens attend once more to the
prompt, a pixel decoder climbs the feature pyramid (nearest upsampling, 3x3 conv, GroupNorm, ReLU),
and each query's mask is its embedding dotted with the per-pixel instance features."""
from __future__ import annotations

from typing import List, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..common import MLP
from .attention import MultiheadAttention


class PixelDecoder(nn.Module):
    """``stages`` conv / norm pairs are built (the public file has three); one runs per finer level."""

    def __init__(self, d: int, stages: int) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in range(stages))
        self.norms = nn.ModuleList(nn.GroupNorm(8, d, eps=1e-5) for _ in range(stages))

    def forward(self, coarse: torch.Tensor, finer: List[torch.Tensor]) -> torch.Tensor:
        """coarse: ``B x d x h x w``; finer: levels from coarse to fine (144, then 288)."""
        y = coarse
        for i, level in enumerate(finer):
            y = level + F.interpolate(y, size=level.shape[-2:], mode="nearest")
            y = F.relu(self.norms[i](self.conv_layers[i](y)))
        return y


class MaskPredictor(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mask_embed = MLP(d, d, d, 3)

    def forward(self, hs: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bqc,bchw->bqhw", self.mask_embed(hs), pixels)


class SegmentationOutput(NamedTuple):
    """pred_masks: ``B x Q x H x W`` logits (288 x 288 for the public model); semantic_seg: ``B x 1 x H x W``."""

    pred_masks: torch.Tensor
    semantic_seg: torch.Tensor


class SegmentationHead(nn.Module):
    def __init__(self, d: int, heads: int, stages: int) -> None:
        super().__init__()
        self.pixel_decoder = PixelDecoder(d, stages)
        self.mask_predictor = MaskPredictor(d)
        self.cross_attend_prompt = MultiheadAttention(d, heads)
        self.cross_attn_norm = nn.LayerNorm(d, eps=1e-5)
        self.semantic_seg_head = nn.Conv2d(d, 1, 1)
        self.instance_seg_head = nn.Conv2d(d, d, 1)

    def forward(self, memory: torch.Tensor, size, fpn: List[torch.Tensor], hs: torch.Tensor,
                prompt: torch.Tensor, prompt_mask: torch.Tensor) -> SegmentationOutput:
        """memory: ``B x HW x d`` fused image tokens; fpn: the neck's kept levels, finest first."""
        b, _, d = memory.shape
        memory = memory + self.cross_attend_prompt(self.cross_attn_norm(memory), prompt, prompt,
                                                   key_padding_mask=prompt_mask)
        coarse = memory.transpose(1, 2).reshape(b, d, *size)
        y = self.pixel_decoder(coarse, list(reversed(fpn[:-1])))
        masks = self.mask_predictor(hs, self.instance_seg_head(y))
        return SegmentationOutput(masks, self.semantic_seg_head(y))
