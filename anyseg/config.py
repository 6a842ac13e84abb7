"""Architecture configs as frozen dataclasses; the named variants are data.

Every number here is a fact about an architecture, not a tuning knob: ``checkpoint.infer_config``
reconstructs these from a state dict's keys and shapes, and ``modeling.sam.build_sam`` builds a
model from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union


@dataclass(frozen=True)
class ViTConfig:
    """Plain ViT image encoder with windowed and global attention (SAM ViT-B/L/H)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    img_size: int = 1024
    mlp_ratio: float = 4.0
    out_chans: int = 256
    use_rel_pos: bool = True
    qkv_bias: bool = True
    in_chans: int = 3

    kind = "vit"

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT image encoder of MobileSAM (``vit_t``)."""

    embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: Tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    img_size: int = 1024
    out_chans: int = 256
    in_chans: int = 3
    # Classifier left over from ImageNet pre-training: present in MobileSAM's file, unused by SAM.
    num_classes: int = 1000
    # Stride of each stage's PatchMerging; None means MobileSAM's rule (stride 1 when the output
    # width is 320, 448 or 576, else 2), which keeps the final grid at img_size / 16.
    merge_strides: Optional[Tuple[int, ...]] = None

    kind = "tiny_vit"

    def strides(self) -> Tuple[int, ...]:
        if self.merge_strides is not None:
            return tuple(self.merge_strides)
        outs = self.embed_dims[1:]
        return tuple(1 if out in (320, 448, 576) else 2 for out in outs)

    def resolutions(self) -> Tuple[int, ...]:
        """Token grid side at the input of each stage (stage 0 is the MBConv stage)."""
        res = [self.img_size // 4]
        for stride in self.strides():
            res.append((res[-1] - 1) // stride + 1)
        return tuple(res)

    @property
    def grid_size(self) -> int:
        return self.resolutions()[-1]


EncoderConfig = Union[ViTConfig, TinyViTConfig]


@dataclass(frozen=True)
class PromptEncoderConfig:
    embed_dim: int = 256
    mask_in_chans: int = 16


@dataclass(frozen=True)
class MaskDecoderConfig:
    transformer_dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class HQConfig:
    """HQ-SAM's extension of the mask decoder (``spec/hq_sam.md``): ``vit_dim`` is the channel count of
    the encoder's intermediate feature (ViT embed dim; TinyViT's third stage width)."""

    vit_dim: int = 768


@dataclass(frozen=True)
class SamConfig:
    encoder: EncoderConfig = field(default_factory=ViTConfig)
    prompt: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    #: None for plain SAM; set for HQ-SAM.
    hq: Optional[HQConfig] = None
    pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375)
    mask_threshold: float = 0.0

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    @property
    def embedding_size(self) -> int:
        return self.encoder.grid_size


VARIANTS = {
    "vit_b": SamConfig(encoder=ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))),
    "vit_l": SamConfig(encoder=ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))),
    "vit_h": SamConfig(encoder=ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))),
    "vit_t": SamConfig(encoder=TinyViTConfig()),
}

# HQ-SAM: the same encoders with the HQ decoder (the registry names of anyseg.hub).
HQ_VARIANTS = {
    "hq_vit_b": SamConfig(encoder=VARIANTS["vit_b"].encoder, hq=HQConfig(vit_dim=768)),
    "hq_vit_l": SamConfig(encoder=VARIANTS["vit_l"].encoder, hq=HQConfig(vit_dim=1024)),
    "hq_vit_h": SamConfig(encoder=VARIANTS["vit_h"].encoder, hq=HQConfig(vit_dim=1280)),
    "hq_vit_tiny": SamConfig(encoder=TinyViTConfig(), hq=HQConfig(vit_dim=160)),
}
