"""SAM wiring: encoder, prompt encoder and mask decoder, with the pre/post-processing between the
original image frame and the model frame. Only :func:`build_sam` knows how the parts are built."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SamConfig, TinyViTConfig, ViTConfig
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .tiny_vit import TinyViT
from .vit import ImageEncoderViT


class Sam(nn.Module):
    """The Segment Anything Model. Attribute names are the public checkpoint's key prefixes."""

    image_format = "RGB"

    def __init__(self, *, config: SamConfig, image_encoder: nn.Module, prompt_encoder: PromptEncoder,
                 mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.mask_threshold = config.mask_threshold
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.config.img_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x h x w`` RGB in [0, 255], long side = img_size -> normalised, zero-padded ``B x 3 x S x S``."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    @property
    def is_hq(self) -> bool:
        """An HQ-SAM model: its decoder needs the encoder's intermediate feature (``interm``)."""
        return getattr(self.mask_decoder, "needs_interm", False)

    def encode_image(self, x: torch.Tensor, return_interm: bool = False):
        """Normalised ``B x 3 x S x S`` -> image embedding ``B x 256 x g x g``; with ``return_interm``
        also the encoder's intermediate feature ``B x g x g x D`` that HQ-SAM's decoder reads."""
        if return_interm:
            return self.image_encoder(x, return_interm=True)
        return self.image_encoder(x)

    def embed_prompts(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Model-frame prompts -> sparse ``B x T x 256`` and dense ``B x 256 x g x g`` embeddings."""
        return self.prompt_encoder(points, boxes, masks)

    def decode(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
               multimask_output: bool, **hq_options) -> Tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits ``B x k x 4g x 4g`` and IoU predictions ``B x k``.

        ``hq_options`` are HQ-SAM's decoder options (``interm_embeddings`` or ``hq_features``,
        ``hq_token_only``); an HQ decoder returns k = 1 mask per prompt."""
        return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                                 multimask_output, **hq_options)

    @torch.no_grad()
    def forward(self, batched_input: List[Dict[str, Any]], multimask_output: bool,
                hq_token_only: bool = False) -> List[Dict[str, torch.Tensor]]:
        """The reference's end-to-end call: images and model-frame prompts in, masks out (no gradients).

        Args:
            batched_input: one dict per image, with ``"image"`` (``3 x h x w`` RGB in [0, 255], already
                resized so that its long side is ``img_size``, e.g. by ``ResizeLongestSide.apply_image``),
                ``"original_size"`` (``(H, W)`` before resizing) and optionally ``"point_coords"``
                (``B x N x 2``, model frame) with ``"point_labels"`` (``B x N``), ``"boxes"`` (``B x 4``,
                model frame) and ``"mask_inputs"`` (``B x 1 x 4g x 4g`` low-res logits).
            multimask_output: three masks per prompt (masks 1..3) instead of one (mask 0).
            hq_token_only: HQ-SAM only (as segment-anything-hq's ``forward``): the HQ mask alone.
        Returns:
            one dict per image: ``"masks"`` (``B x k x H x W`` bool), ``"iou_predictions"`` (``B x k``)
            and ``"low_res_logits"`` (``B x k x 4g x 4g``).
        """
        if hq_token_only and not self.is_hq:
            raise ValueError("hq_token_only needs an HQ-SAM model")
        images = torch.stack([self.preprocess(record["image"]) for record in batched_input], dim=0)
        if self.is_hq:
            embeddings, interms = self.encode_image(images, return_interm=True)
        else:
            embeddings, interms = self.encode_image(images), None
        outputs = []
        for i, record in enumerate(batched_input):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(points=points, boxes=record.get("boxes"),
                                                masks=record.get("mask_inputs"))
            hq_options = {}
            if interms is not None:
                hq_options = dict(interm_embeddings=interms[i : i + 1], hq_token_only=hq_token_only)
            low_res, iou = self.mask_decoder(image_embeddings=embeddings[i : i + 1],
                                             image_pe=self.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=multimask_output, **hq_options)
            masks = self.postprocess_masks(low_res, input_size=tuple(record["image"].shape[-2:]),
                                           original_size=tuple(record["original_size"]))
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou,
                            "low_res_logits": low_res})
        return outputs

    def postprocess_masks(self, masks: torch.Tensor, input_size: Tuple[int, int],
                          original_size: Tuple[int, int]) -> torch.Tensor:
        """Low-res logits ``B x k x 4g x 4g`` -> logits in the original frame ``B x k x H x W``:
        upscale to ``S x S``, crop the padding, resize to the original size (bilinear)."""
        s = self.img_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


def build_image_encoder(config) -> nn.Module:
    if isinstance(config, ViTConfig):
        return ImageEncoderViT(config)
    if isinstance(config, TinyViTConfig):
        return TinyViT(config)
    raise TypeError(f"unknown encoder config {type(config).__name__}")


def build_sam(config: SamConfig) -> Sam:
    """Build an (untrained) SAM from a config."""
    encoder = build_image_encoder(config.encoder)
    prompt = PromptEncoder(config.prompt, img_size=config.img_size, embedding_size=config.embedding_size)
    if config.hq is not None:
        from .hq import HQMaskDecoder

        decoder = HQMaskDecoder(config.decoder, vit_dim=config.hq.vit_dim)
    else:
        decoder = MaskDecoder(config.decoder)
    return Sam(config=config, image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
