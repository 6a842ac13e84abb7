"""SAM wiring: encoder, prompt encoder and mask decoder, with the pre/post-processing between the
original image frame and the model frame. Only :func:`build_sam` knows how the parts are built."""
from __future__ import annotations

from typing import Optional, Tuple

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
