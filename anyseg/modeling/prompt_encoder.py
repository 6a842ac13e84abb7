"""Prompt encoder: points, boxes and low-res masks -> sparse tokens and a dense embedding.

Coordinates arrive in the model frame (pixels of the ``S x S`` padded input, S = 1024 for SAM).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..config import PromptEncoderConfig
from .common import LayerNorm2d

# Point labels: -1 padding ("not a point"), 0 background, 1 foreground, 2 / 3 box corners.
PAD_LABEL = -1


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of XY in [0, 1]^2: ``[sin(2pi (2p-1) G), cos(...)]``."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``... x 2`` normalised XY -> ``... x 2F``."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of the cell centres of an ``h x w`` grid: ``2F x h x w``."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=matrix.device, dtype=matrix.dtype) + 0.5) / h
        xs = (torch.arange(w, device=matrix.device, dtype=matrix.dtype) + 0.5) / w
        xy = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self.encode(xy).permute(2, 0, 1)

    def points(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """``B x N x 2`` XY pixels in an ``image_size`` (h, w) frame -> ``B x N x 2F``."""
        coords = coords.clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self.encode(coords.to(self.positional_encoding_gaussian_matrix.dtype))


class PromptEncoder(nn.Module):
    def __init__(self, config: PromptEncoderConfig, *, img_size: int, embedding_size: int) -> None:
        super().__init__()
        dim = config.embed_dim
        self.embed_dim = dim
        self.input_image_size = (img_size, img_size)
        self.image_embedding_size = (embedding_size, embedding_size)
        self.mask_input_size = (4 * embedding_size, 4 * embedding_size)
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        # 0 background point, 1 foreground point, 2 box top-left, 3 box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        chans = config.mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(chans // 4),
            nn.GELU(),
            nn.Conv2d(chans // 4, chans, kernel_size=2, stride=2),
            LayerNorm2d(chans),
            nn.GELU(),
            nn.Conv2d(chans, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: ``1 x C x h x w``."""
        return self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``B x N x 2`` model-frame XY and ``B x N`` labels (-1..3) -> ``B x N(+1) x C``."""
        coords = coords + 0.5  # pixel centres
        if pad:
            b = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, -torch.ones(b, 1, dtype=labels.dtype, device=labels.device)], dim=1)
        emb = self.pe_layer.points(coords, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == PAD_LABEL, torch.zeros_like(emb), emb)
        emb = emb + (labels == PAD_LABEL) * self.not_a_point_embed.weight
        for value, table in enumerate(self.point_embeddings):
            emb = emb + (labels == value) * table.weight
        return emb

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``B x 4`` model-frame XYXY -> ``B x 2 x C`` corner tokens."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.points(corners, self.input_image_size)
        emb[:, 0, :] = emb[:, 0, :] + self.point_embeddings[2].weight
        emb[:, 1, :] = emb[:, 1, :] + self.point_embeddings[3].weight
        return emb

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``B x 1 x 4h x 4w`` low-res logits -> ``B x C x h x w``."""
        return self.mask_downscaling(masks)

    @property
    def mask_projection(self) -> nn.Conv2d:
        """The last layer of the mask embedding: a 1 x 1 convolution from ``mask_in_chans`` to C."""
        return self.mask_downscaling[-1]

    def mask_features(self, masks: torch.Tensor) -> torch.Tensor:
        """``B x 1 x 4h x 4w`` low-res logits -> ``B x mask_in_chans x h x w``, the mask embedding before
        :attr:`mask_projection` (``embed_masks(m) == mask_projection(mask_features(m))``)."""
        return self.mask_downscaling[:-1](masks)

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse tokens ``B x T x C`` (points, pad point if no box, box corners) and the dense
        embedding ``B x C x h x w``."""
        if points is not None:
            b = points[0].shape[0]
        elif boxes is not None:
            b = boxes.shape[0]
        elif masks is not None:
            b = masks.shape[0]
        else:
            b = 1
        weight = self.no_mask_embed.weight
        sparse = weight.new_empty((b, 0, self.embed_dim))
        if points is not None:
            sparse = torch.cat([sparse, self.embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        return sparse, dense
