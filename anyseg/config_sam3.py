"""SAM 3 image-detector configs as frozen dataclasses; the public checkpoint's values are the defaults.

Numbers follow ``spec/sam3.md`` section 1. :func:`anyseg.sam3_checkpoint.infer_sam3_config` reads
them back from a state dict's keys and shapes, and :func:`anyseg.modeling.sam3.build_sam3` builds
the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple


@dataclass(frozen=True)
class PerceptionViTConfig:
    """The Perception Encoder ViT (``backbone.vision_backbone.trunk.*``)."""

    embed_dim: int = 1024
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.625
    global_att_blocks: Tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 24
    patch_size: int = 14
    image_size: int = 1008
    pretrain_image_size: int = 336
    rope_theta: float = 10000.0

    @property
    def grid(self) -> int:
        """Tokens per side (72 for the public model)."""
        return self.image_size // self.patch_size

    @property
    def pretrain_grid(self) -> int:
        return self.pretrain_image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass(frozen=True)
class TextEncoderConfig:
    """The CLIP-style text encoder (``backbone.language_backbone.encoder.*``) and its resizer."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    context_length: int = 32
    vocab_size: int = 49408
    projection_dim: int = 512


@dataclass(frozen=True)
class Sam3Config:
    """The SAM 3 image detector. ``d_model`` / ``num_heads`` apply to every detector block."""

    vit: PerceptionViTConfig = field(default_factory=PerceptionViTConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    d_model: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    geometry_layers: int = 3
    num_queries: int = 200
    roi_size: int = 7
    neck_scales: Tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    scalp: int = 1
    pixel_decoder_stages: int = 3
    score_clamp: float = 12.0

    kind = "sam3"

    @property
    def image_size(self) -> int:
        return self.vit.image_size


SAM3_PUBLIC = Sam3Config()
"""The configuration of the public ``sam3.pt`` (hub id ``facebook/sam3``)."""
