"""Wiring of the SAM 3 image detector (spec/sam3.md sections 3-10); module names follow the checkpoint
keys after the ``detector.`` prefix. Only :func:`build_sam3` knows how the blocks fit together.

Tensors are batch-first inside; image tokens are the ``g x g`` grid flattened row-major.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ...config_sam3 import Sam3Config
from .decoder import Sam3Decoder
from .encoder import FusionEncoder
from .geometry import GeometryEncoder
from .neck import VisionBackbone, VisionFeatures
from .scoring import DotProductScoring
from .seg_head import SegmentationHead
from .text import LanguageBackbone, TextFeatures
from .vit import PerceptionViT


class Backbone(nn.Module):
    def __init__(self, vision_backbone: VisionBackbone, language_backbone: LanguageBackbone) -> None:
        super().__init__()
        self.vision_backbone = vision_backbone
        self.language_backbone = language_backbone


class DetrTransformer(nn.Module):
    def __init__(self, encoder: FusionEncoder, decoder: Sam3Decoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder


class Prompt(NamedTuple):
    """tokens: ``B x P x d`` (text tokens, then exemplar boxes, then the geometry CLS token);
    mask: ``B x P`` bool, True = ignore; geometry: ``B x (n+1) x d``, the geometry encoder's output."""

    tokens: torch.Tensor
    mask: torch.Tensor
    geometry: torch.Tensor


class Detections(NamedTuple):
    """Raw outputs of one detection run, all for the ``Q`` queries in order.

    pred_logits: ``B x Q``; pred_boxes: ``B x Q x 4`` normalised cxcywh; presence_logit: ``B x 1``;
    presence_per_layer: ``B x layers``; queries: ``B x Q x d``; pred_masks: ``B x Q x h x w`` logits
    (288 x 288 for the public model); semantic_seg: ``B x 1 x h x w``;
    encoder_hidden_states: ``B x HW x d``; prompt: the :class:`Prompt` used.
    """

    pred_logits: torch.Tensor
    pred_boxes: torch.Tensor
    presence_logit: torch.Tensor
    presence_per_layer: torch.Tensor
    queries: torch.Tensor
    pred_masks: torch.Tensor
    semantic_seg: torch.Tensor
    encoder_hidden_states: torch.Tensor
    prompt: Prompt

    @property
    def scores(self) -> torch.Tensor:
        """``B x Q`` probabilities: query score times presence."""
        return self.pred_logits.sigmoid() * self.presence_logit.sigmoid()


class Sam3(nn.Module):
    """The SAM 3 image detector: a phrase and / or exemplar boxes -> every matching instance."""

    def __init__(self, config: Sam3Config, *, backbone: Backbone, geometry_encoder: GeometryEncoder,
                 transformer: DetrTransformer, dot_prod_scoring: DotProductScoring,
                 segmentation_head: SegmentationHead) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.geometry_encoder = geometry_encoder
        self.transformer = transformer
        self.dot_prod_scoring = dot_prod_scoring
        self.segmentation_head = segmentation_head
        #: Reduced precision for the ViT trunk (set by anyseg.speed presets through
        #: anyseg.protocol.apply_speed: bfloat16 on CPUs with native bfloat16, float16 on CUDA). None:
        #: the reference float32 computation. The neck and everything after it stay float32.
        self.trunk_dtype: Optional[torch.dtype] = None

    @property
    def device(self) -> torch.device:
        return self.geometry_encoder.cls_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.geometry_encoder.cls_embed.weight.dtype

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def encode_image(self, image: torch.Tensor) -> VisionFeatures:
        """image: ``B x 3 x S x S``, normalised to [-1, 1]."""
        vision = self.backbone.vision_backbone
        if self.trunk_dtype is None:
            return vision(image)
        with torch.autocast(image.device.type, dtype=self.trunk_dtype):
            x = vision.trunk(image)
        return vision.neck(x.to(image.dtype))

    def encode_text(self, ids: torch.Tensor) -> TextFeatures:
        """ids: ``B x L`` token ids (see :mod:`anyseg.sam3_tokenizer`)."""
        return self.backbone.language_backbone(ids)

    def encode_prompt(self, features: VisionFeatures, text: TextFeatures, boxes: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None) -> Prompt:
        """boxes: ``B x n x 4`` normalised cxcywh (``None`` for none); labels: ``B x n`` (1 positive, 0 negative)."""
        image, pos, size = self._tokens(features)
        b = image.shape[0]
        if boxes is None:
            boxes = image.new_zeros(b, 0, 4)
            labels = torch.zeros(b, 0, dtype=torch.long, device=image.device)
        geo, geo_mask = self.geometry_encoder(boxes.to(image.dtype), labels, image, pos, size)
        tokens = torch.cat([text.features.expand(b, -1, -1), geo], dim=1)
        mask = torch.cat([text.mask.expand(b, -1), geo_mask], dim=1)
        return Prompt(tokens, mask, geo)

    @staticmethod
    def _tokens(features: VisionFeatures):
        f, p = features.fpn[-1], features.pos[-1]
        return f.flatten(2).transpose(1, 2), p.flatten(2).transpose(1, 2), tuple(f.shape[-2:])

    def detect(self, features: VisionFeatures, prompt: Prompt) -> Detections:
        """Run the fusion encoder, decoder, scoring and segmentation head for one prompt."""
        image, pos, size = self._tokens(features)
        memory = self.transformer.encoder(image, pos, prompt.tokens, prompt.mask)
        dec = self.transformer.decoder(prompt.tokens, prompt.mask, memory, pos, size)
        logits = self.dot_prod_scoring(dec.queries, prompt.tokens, prompt.mask)
        seg = self.segmentation_head(memory, size, features.fpn, dec.queries, prompt.tokens, prompt.mask)
        return Detections(logits, dec.pred_boxes, dec.presence_logit, dec.presence_per_layer, dec.queries,
                          seg.pred_masks, seg.semantic_seg, memory, prompt)

    def forward(self, image: torch.Tensor, ids: torch.Tensor, boxes: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> Detections:
        features = self.encode_image(image)
        return self.detect(features, self.encode_prompt(features, self.encode_text(ids), boxes, labels))


def build_sam3(config: Sam3Config) -> Sam3:
    c = config
    d = c.d_model
    vision = VisionBackbone(PerceptionViT(c.vit), in_dim=c.vit.embed_dim, out_dim=d, scales=c.neck_scales,
                            scalp=c.scalp)
    backbone = Backbone(vision, LanguageBackbone(c.text, d))
    return Sam3(
        c,
        backbone=backbone,
        geometry_encoder=GeometryEncoder(d, c.num_heads, c.ffn_dim, c.geometry_layers, c.roi_size),
        transformer=DetrTransformer(FusionEncoder(d, c.num_heads, c.ffn_dim, c.encoder_layers),
                                    Sam3Decoder(d, c.num_heads, c.ffn_dim, c.decoder_layers, c.num_queries)),
        dot_prod_scoring=DotProductScoring(d, c.ffn_dim, c.score_clamp),
        segmentation_head=SegmentationHead(d, c.num_heads, c.pixel_decoder_stages),
    )
