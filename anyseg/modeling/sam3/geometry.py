"""The geometry encoder (spec/sam3.md section 7): exemplar boxes (positive / negative) become prompt
tokens, followed by a CLS token, refined by a few pre-norm layers that attend to the image."""
from __future__ import annotations

import torch
from torch import nn

from .encoder import PreNormLayer
from .position import sine_scalar
from .roi_align import roi_align


class GeometryLayer(PreNormLayer):
    """Pre-norm: self-attention, cross-attention to the image (keys carry its position), ReLU FFN."""

    def forward(self, x, mask, image, image_pos):
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y, key_padding_mask=mask)
        x = x + self.cross_attn_image(self.norm2(x), image + image_pos, image)
        return x + self.ffn(x)


class GeometryEncoder(nn.Module):
    """Boxes -> prompt tokens. The point branches (``points_*``) are loaded; the image API gives no points."""

    def __init__(self, d: int, heads: int, ffn: int, layers: int, roi_size: int) -> None:
        super().__init__()
        self.roi_size = roi_size
        self.label_embed = nn.Embedding(2, d)
        self.cls_embed = nn.Embedding(1, d)
        self.points_direct_project = nn.Linear(2, d)
        self.points_pool_project = nn.Linear(d, d)
        self.points_pos_enc_project = nn.Linear(d, d)
        self.boxes_direct_project = nn.Linear(4, d)
        self.boxes_pool_project = nn.Conv2d(d, d, roi_size)
        self.boxes_pos_enc_project = nn.Linear(d + 2, d)
        self.final_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.img_pre_norm = nn.LayerNorm(d, eps=1e-5)
        self.encode = nn.ModuleList(GeometryLayer(d, heads, ffn) for _ in range(layers))
        self.encode_norm = nn.LayerNorm(d, eps=1e-5)

    def embed_boxes(self, boxes: torch.Tensor, labels: torch.Tensor, image: torch.Tensor,
                    size: tuple) -> torch.Tensor:
        """boxes: ``B x n x 4`` normalised cxcywh; labels: ``B x n`` (1 positive, 0 negative);
        image: ``B x HW x d`` raw features. Returns ``B x n x d``."""
        b, n, _ = boxes.shape
        d = image.shape[-1]
        h, w = size
        pooled_from = self.img_pre_norm(image).transpose(1, 2).reshape(b, d, h, w)
        cx, cy, bw, bh = boxes.unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
        xyxy = xyxy * torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        pooled = torch.stack([roi_align(pooled_from[i], xyxy[i], self.roi_size) for i in range(b)])
        pooled = self.boxes_pool_project(pooled.flatten(0, 1)).view(b, n, d)
        enc = torch.cat([sine_scalar(cy, d // 2), sine_scalar(cx, d // 2), bh[..., None], bw[..., None]], dim=-1)
        return (self.boxes_direct_project(boxes) + pooled + self.boxes_pos_enc_project(enc)
                + self.label_embed(labels.long()))

    def forward(self, boxes: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, image_pos: torch.Tensor,
                size: tuple):
        """Returns (tokens ``B x (n+1) x d``, mask ``B x (n+1)`` bool, True = ignore): boxes, then CLS."""
        b = image.shape[0]
        cls = self.cls_embed.weight[None].expand(b, -1, -1)
        if boxes.shape[1]:
            x = torch.cat([self.embed_boxes(boxes, labels, image, size), cls], dim=1)
        else:
            x = cls
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        x = self.norm(self.final_proj(x))
        for layer in self.encode:
            x = layer(x, mask, image, image_pos)
        return self.encode_norm(x), mask
