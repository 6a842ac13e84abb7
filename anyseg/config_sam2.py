"""SAM 2 / SAM 2.1 architecture configs as frozen dataclasses; the eight public variants are data.

Numbers follow ``spec/sam2.md`` section 11. :func:`anyseg.sam2_checkpoint.infer_sam2_config`
reconstructs these from a state dict (plus, for layouts other than the public four, a reference
YAML file), and :func:`anyseg.modeling.sam2.build_sam2_model` builds a model from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Tuple


@dataclass(frozen=True)
class HieraConfig:
    """Hiera trunk (``image_encoder.trunk.*``)."""

    embed_dim: int = 96
    num_heads: int = 1
    stages: Tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: Tuple[int, ...] = (5, 7, 9)
    window_spec: Tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: Tuple[int, int] = (7, 7)
    q_pool: int = 3
    q_stride: Tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0

    kind = "hiera"

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> Tuple[int, ...]:
        ends, total = [], 0
        for n in self.stages:
            total += n
            ends.append(total - 1)
        return tuple(ends)

    @property
    def q_pool_blocks(self) -> Tuple[int, ...]:
        """Blocks that pool their queries: the first blocks of stages 2.. (``q_pool`` of them)."""
        return tuple(end + 1 for end in self.stage_ends[:-1])[: self.q_pool]

    @property
    def channel_list(self) -> Tuple[int, ...]:
        """Widths of the four stage outputs, deepest first (the neck's ``backbone_channel_list``)."""
        return tuple(int(self.embed_dim * self.dim_mul ** i) for i in range(len(self.stages)))[::-1]


@dataclass(frozen=True)
class NeckConfig:
    """FPN neck (``image_encoder.neck.*``) without output convolutions."""

    d_model: int = 256
    backbone_channel_list: Tuple[int, ...] = (768, 384, 192, 96)
    fpn_top_down_levels: Tuple[int, ...] = (2, 3)
    fpn_interp_model: str = "nearest"
    scalp: int = 1


@dataclass(frozen=True)
class MemoryAttentionConfig:
    d_model: int = 256
    num_layers: int = 4
    dim_feedforward: int = 2048
    num_heads: int = 1
    kv_in_dim: int = 64
    rope_theta: float = 10000.0
    feat_sizes: Tuple[int, int] = (64, 64)
    pos_enc_at_input: bool = True


@dataclass(frozen=True)
class MemoryEncoderConfig:
    out_dim: int = 64
    in_dim: int = 256
    fuser_num_layers: int = 2
    kernel_size: int = 7
    mask_downsample_stride: int = 16


@dataclass(frozen=True)
class Sam2Config:
    """A whole SAM 2 / 2.1 model: trunk, neck, decoder, memory and the behavioural flags."""

    trunk: HieraConfig = field(default_factory=HieraConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    memory_attention: MemoryAttentionConfig = field(default_factory=MemoryAttentionConfig)
    memory_encoder: MemoryEncoderConfig = field(default_factory=MemoryEncoderConfig)
    version: str = "2.1"
    image_size: int = 1024
    backbone_stride: int = 16
    num_maskmem: int = 7
    mem_dim: int = 64
    # prompt encoder / mask decoder (as SAM 1, 256 wide)
    transformer_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    use_high_res_features_in_sam: bool = True
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    # dynamic multimask fallback (set by both reference builders)
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    # memory / video behaviour
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    use_mask_input_as_output_without_sam: bool = True
    directly_add_no_mem_embed: bool = True
    multimask_output_in_sam: bool = True
    multimask_output_for_tracking: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    use_obj_ptrs_in_encoder: bool = True
    max_obj_ptrs_in_encoder: int = 16
    only_obj_ptrs_in_the_past_for_eval: bool = True
    fixed_no_obj_ptr: bool = True
    soft_no_obj_ptr: bool = False
    use_mlp_for_obj_ptr_proj: bool = True
    no_obj_embed_spatial: bool = True
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = True
    use_signed_tpos_enc_to_obj_ptrs: bool = True
    max_cond_frames_in_attn: int = -1
    memory_temporal_stride_for_eval: int = 1
    non_overlap_masks_for_mem_enc: bool = False
    binarize_mask_from_pts_for_mem_enc: bool = False
    fill_hole_area: int = 0
    pixel_mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    mask_threshold: float = 0.0

    family = "sam2"

    @property
    def img_size(self) -> int:
        return self.image_size

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.backbone_stride

    def for_video(self) -> "Sam2Config":
        """The settings the reference video builder adds (``build_sam2_video_predictor``)."""
        return replace(self, binarize_mask_from_pts_for_mem_enc=True, fill_hole_area=8)


#: The 2.0 flags (spec 11.3); 2.1 is the dataclass default.
SAM20_FLAGS = dict(version="2.0", no_obj_embed_spatial=False, add_tpos_enc_to_obj_ptrs=False,
                   proj_tpos_enc_in_obj_ptrs=False, use_signed_tpos_enc_to_obj_ptrs=False)

#: Hiera rows of spec 11.1, by size letter.
HIERA = {
    "t": HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                     window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(7, 7)),
    "s": HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                     window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(7, 7)),
    "b+": HieraConfig(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
                      window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(14, 14)),
    "l": HieraConfig(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                     window_spec=(8, 4, 16, 8), window_pos_embed_bkg_spatial_size=(7, 7)),
}


def sam2_config(size: str, version: str = "2.1") -> Sam2Config:
    """The public configuration of a size (``t``, ``s``, ``b+``, ``l``) and version (``2.0``/``2.1``)."""
    if size not in HIERA:
        raise ValueError(f"unknown SAM 2 size {size!r}; expected one of {', '.join(HIERA)}")
    trunk = HIERA[size]
    config = Sam2Config(trunk=trunk, neck=NeckConfig(backbone_channel_list=trunk.channel_list))
    if version == "2.0":
        return replace(config, **SAM20_FLAGS)
    if version != "2.1":
        raise ValueError(f"unknown SAM 2 version {version!r}; expected '2.0' or '2.1'")
    return config


SAM2_VARIANTS: Dict[str, Sam2Config] = {
    f"{prefix}_hiera_{size}": sam2_config(size, version)
    for prefix, version in (("sam2", "2.0"), ("sam2.1", "2.1"))
    for size in HIERA
}
