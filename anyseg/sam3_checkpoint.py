"""SAM 3 checkpoints: recognise them, infer the image detector's configuration from keys and shapes,
and load it.

``sam3.pt`` holds ``detector.*`` keys (the image model) and ``tracker.*`` keys (the video tracker,
not used by the image model yet); it may be flat or nested under ``"model"``. A state dict whose keys
are already without the ``detector.`` prefix is accepted too. Head counts are not in the file: the
detector uses 8; the ViT's follow from its RoPE tables; the text encoder's are 64 channels per head
(CLIP's convention), or 8 channels per head for encoders narrower than 64.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from .checkpoint import CheckpointError, check_keys, read_state_dict, unwrap_state_dict
from .config_sam3 import PerceptionViTConfig, Sam3Config, TextEncoderConfig
from .modeling.sam3 import Sam3, build_sam3

__all__ = ["is_sam3_state_dict", "detector_state_dict", "infer_sam3_config", "sam3_model_from_state_dict",
           "load_sam3_model", "UNUSED_DETECTOR_PREFIXES"]

DETECTOR = "detector."
TRACKER = "tracker."
TRUNK = "backbone.vision_backbone.trunk."
TEXT = "backbone.language_backbone.encoder."
#: Keys of ``sam3.pt`` that the image detector does not use: the interactive (SAM 1 task) neck, which
#: feeds the tracker's SAM 2 heads (spec/sam3.md section 12).
UNUSED_DETECTOR_PREFIXES = ("backbone.vision_backbone.sam2_convs.",)
DETECTOR_HEADS = 8


def is_sam3_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for a SAM 3 state dict: ``detector.*`` keys, or the detector's own keys without the prefix."""
    return any(k.startswith(DETECTOR + TRUNK) or k.startswith(TRUNK) and "freqs_cis" in k
               or k.startswith("backbone.language_backbone.") for k in sd)


def detector_state_dict(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The image detector's keys without the ``detector.`` prefix; ``tracker.*`` and the unused
    interactive neck are left out (they load without complaint: the image model has no use for them)."""
    if any(k.startswith(DETECTOR) for k in sd):
        out = {k[len(DETECTOR):]: v for k, v in sd.items() if k.startswith(DETECTOR)}
    else:
        out = {k: v for k, v in sd.items() if not k.startswith(TRACKER)}
    return {k: v for k, v in out.items() if not k.startswith(UNUSED_DETECTOR_PREFIXES)}


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    regex = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd for m in [regex.match(k)] if m}
    return max(found) + 1 if found else 0


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return sd[key]
    except KeyError:
        raise CheckpointError(f"incomplete SAM 3 checkpoint: key {DETECTOR + key!r} is missing") from None


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{what}: {n} positions is not a square grid")
    return side


def _infer_vit(sd: Mapping[str, torch.Tensor], image_size: Optional[int]) -> PerceptionViTConfig:
    proj = _need(sd, TRUNK + "patch_embed.proj.weight")
    dim, patch = proj.shape[0], proj.shape[-1]
    depth = _count(sd, TRUNK + "blocks.")
    if depth == 0:
        raise CheckpointError("SAM 3 ViT without blocks (no detector.backbone.vision_backbone.trunk.blocks.* keys)")
    pretrain = _square_side(_need(sd, TRUNK + "pos_embed").shape[1] - 1, "trunk.pos_embed") * patch
    lengths = [_need(sd, TRUNK + f"blocks.{i}.attn.freqs_cis").shape for i in range(depth)]
    head_dim = 2 * lengths[0][1]
    longest = max(shape[0] for shape in lengths)
    grid = _square_side(longest, "trunk RoPE table")
    windows = {_square_side(shape[0], "trunk RoPE table") for shape in lengths if shape[0] != longest}
    if len(windows) > 1:
        raise CheckpointError(f"windowed blocks disagree on the window size: {sorted(windows)}")
    global_blocks = tuple(i for i, shape in enumerate(lengths) if shape[0] == longest)
    window = windows.pop() if windows else grid
    if image_size is not None and image_size != grid * patch:
        raise CheckpointError(f"the RoPE tables are for {grid * patch} px inputs, not {image_size}")
    hidden = _need(sd, TRUNK + "blocks.0.mlp.fc1.weight").shape[0]
    return PerceptionViTConfig(embed_dim=dim, depth=depth, num_heads=dim // head_dim, mlp_ratio=hidden / dim,
                               global_att_blocks=global_blocks, window_size=window, patch_size=patch,
                               image_size=grid * patch, pretrain_image_size=pretrain)


def _infer_text(sd: Mapping[str, torch.Tensor]) -> TextEncoderConfig:
    tokens = _need(sd, TEXT + "token_embedding.weight")
    width = tokens.shape[1]
    heads = width // 64 if width >= 64 and width % 64 == 0 else max(1, width // 8)
    return TextEncoderConfig(width=width, layers=_count(sd, TEXT + "transformer.resblocks."), heads=heads,
                             mlp_dim=_need(sd, TEXT + "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
                             context_length=_need(sd, TEXT + "positional_embedding").shape[0],
                             vocab_size=tokens.shape[0],
                             projection_dim=_need(sd, TEXT + "text_projection").shape[1])


def infer_sam3_config(sd: Mapping[str, torch.Tensor], *, image_size: Optional[int] = None) -> Sam3Config:
    """The :class:`Sam3Config` of a detector state dict (keys without ``detector.``) or a whole ``sam3.pt``."""
    if any(k.startswith(DETECTOR) for k in sd):
        sd = detector_state_dict(sd)
    if not any(k.startswith(TRUNK) for k in sd):
        sample = ", ".join(list(sd)[:5])
        raise CheckpointError(f"not a SAM 3 checkpoint: no 'detector.backbone.vision_backbone.trunk.*' keys "
                              f"(found {len(sd)} keys such as {sample})")
    vit = _infer_vit(sd, image_size)
    d = _need(sd, "transformer.decoder.query_embed.weight").shape[1]
    levels = _count(sd, "backbone.vision_backbone.convs.")
    scales = (4.0, 2.0, 1.0, 0.5)[:levels]
    if levels != 4:
        raise CheckpointError(f"SAM 3 neck: expected 4 levels (backbone.vision_backbone.convs.0-3), found {levels}")
    return Sam3Config(
        vit=vit, text=_infer_text(sd), d_model=d, num_heads=DETECTOR_HEADS,
        ffn_dim=_need(sd, "transformer.encoder.layers.0.linear1.weight").shape[0],
        encoder_layers=_count(sd, "transformer.encoder.layers."),
        decoder_layers=_count(sd, "transformer.decoder.layers."),
        geometry_layers=_count(sd, "geometry_encoder.encode."),
        num_queries=_need(sd, "transformer.decoder.query_embed.weight").shape[0],
        roi_size=_need(sd, "geometry_encoder.boxes_pool_project.weight").shape[-1],
        neck_scales=scales,
        pixel_decoder_stages=_count(sd, "segmentation_head.pixel_decoder.conv_layers."),
    )


def sam3_model_from_state_dict(sd: Mapping[str, torch.Tensor], *, config: Optional[Sam3Config] = None,
                               source: str = "state dict") -> Sam3:
    """Build the image detector for ``sd`` (a whole ``sam3.pt`` or its detector part) and load it strictly
    (``tracker.*`` and the interactive neck are set aside first)."""
    sd = unwrap_state_dict(sd, source)
    det = detector_state_dict(sd)
    if config is not None and not isinstance(config, Sam3Config):
        raise TypeError(f"{source} is a SAM 3 checkpoint: config must be a Sam3Config, got {type(config).__name__}")
    config = config or infer_sam3_config(det)
    model = build_sam3(config)
    try:
        check_keys(model, det, f"{source} (detector.* keys)")
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace("the SAM architecture", "the SAM 3 architecture")) from None
    model.load_state_dict(det, strict=True)
    return model.eval()


def load_sam3_model(path: Union[str, Path], *, config: Optional[Sam3Config] = None) -> Sam3:
    """Read ``sam3.pt`` (or the golden file) and build the image detector (eval mode, CPU, float32)."""
    return sam3_model_from_state_dict(read_state_dict(path), config=config, source=str(path))
