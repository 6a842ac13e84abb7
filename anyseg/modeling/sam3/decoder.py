"""The DETR-style decoder (spec/sam3.md section 9): 200 queries and a presence token, box refinement
layer by layer, and a box-relative position bias (boxRPB, "log" map) on the image cross-attention."""
from __future__ import annotations

import math
from typing import List, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..common import MLP
from .attention import MultiheadAttention
from .position import sine_boxes


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def log_map(delta: torch.Tensor) -> torch.Tensor:
    """``sign(8 d) log2(8 |d| + 1) / 3``: signed log distance used by boxRPB."""
    delta = delta * 8
    return torch.sign(delta) * torch.log2(delta.abs() + 1.0) / math.log2(8)


class DecoderLayer(nn.Module):
    """Post-norm: self-attention, cross-attention to the prompt, to the image (with boxRPB), FFN."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.ca_text = MultiheadAttention(d, heads)
        self.catext_norm = nn.LayerNorm(d, eps=1e-5)
        self.cross_attn = MultiheadAttention(d, heads)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm3 = nn.LayerNorm(d, eps=1e-5)

    def forward(self, t, pos, prompt, prompt_mask, memory, memory_pos, rpb):
        q = t + pos
        t = self.norm2(t + self.self_attn(q, q, t))
        t = self.catext_norm(t + self.ca_text(t + pos, prompt, prompt, key_padding_mask=prompt_mask))
        t = self.norm1(t + self.cross_attn(t + pos, memory + memory_pos, memory, attn_mask=rpb))
        return self.norm3(t + self.linear2(F.relu(self.linear1(t))))


class DecoderOutput(NamedTuple):
    """pred_boxes: ``B x Q x 4`` cxcywh in [0, 1]; queries: ``B x Q x d`` (last layer, normed);
    presence_logit: ``B x 1``; presence_per_layer: ``B x layers``."""

    pred_boxes: torch.Tensor
    queries: torch.Tensor
    presence_logit: torch.Tensor
    presence_per_layer: torch.Tensor


class Sam3Decoder(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, layers: int, num_queries: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.layers = nn.ModuleList(DecoderLayer(d, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d)
        self.reference_points = nn.Embedding(num_queries, 4)
        self.boxRPB_embed_x = MLP(2, d, heads, 2)
        self.boxRPB_embed_y = MLP(2, d, heads, 2)
        self.presence_token = nn.Embedding(1, d)
        self.presence_token_head = MLP(d, d, 1, 3)
        self.presence_token_out_norm = nn.LayerNorm(d, eps=1e-5)
        self.ref_point_head = MLP(2 * d, d, d, 2)

    def box_rpb(self, ref: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``B x Q x 4`` boxes -> additive bias ``B x heads x Q x (h*w)``."""
        b, q, _ = ref.shape
        x0, y0, x1, y1 = box_cxcywh_to_xyxy(ref).unbind(-1)
        gx = torch.arange(w, dtype=ref.dtype, device=ref.device) / w
        gy = torch.arange(h, dtype=ref.dtype, device=ref.device) / h
        dx = gx[None, None, :, None] - torch.stack([x0, x1], dim=-1)[:, :, None, :]  # B x Q x w x 2
        dy = gy[None, None, :, None] - torch.stack([y0, y1], dim=-1)[:, :, None, :]
        bx = self.boxRPB_embed_x(log_map(dx))  # B x Q x w x heads
        by = self.boxRPB_embed_y(log_map(dy))
        bias = by[:, :, :, None, :] + bx[:, :, None, :, :]  # B x Q x h x w x heads
        return bias.flatten(2, 3).permute(0, 3, 1, 2)

    def forward(self, prompt, prompt_mask, memory, memory_pos, size) -> DecoderOutput:
        """prompt: ``B x P x d``; memory / memory_pos: ``B x HW x d``; size: (h, w) of the memory grid."""
        b, d = memory.shape[0], memory.shape[-1]
        h, w = size
        queries = self.query_embed.weight[None].expand(b, -1, -1)
        presence = self.presence_token.weight[None].expand(b, -1, -1)
        t = torch.cat([presence, queries], dim=1)
        ref = self.reference_points.weight.sigmoid()[None].expand(b, -1, -1)
        presence_logits: List[torch.Tensor] = []
        hs = None
        for layer in self.layers:
            query_pos = self.ref_point_head(sine_boxes(ref, d // 2))
            pos = torch.cat([torch.zeros_like(query_pos[:, :1]), query_pos], dim=1)
            rpb = self.box_rpb(ref, h, w)
            rpb = torch.cat([torch.zeros_like(rpb[:, :, :1]), rpb], dim=2)  # the presence row: no bias
            t = layer(t, pos, prompt, prompt_mask, memory, memory_pos, rpb.flatten(0, 1))
            hs = self.norm(t[:, 1:])
            ref = (inverse_sigmoid(ref) + self.bbox_embed(hs)).sigmoid()
            # The reference clamps this logit to +-10 but discards the result, so it is not clamped.
            presence_logits.append(self.presence_token_head(self.presence_token_out_norm(t[:, :1]))[:, 0])
        per_layer = torch.cat(presence_logits, dim=-1)
        return DecoderOutput(ref, hs, per_layer[:, -1:], per_layer)
