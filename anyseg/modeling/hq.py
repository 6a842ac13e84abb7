"""HQ-SAM's mask decoder: SAM 1's decoder plus one high-quality output token.

The HQ token joins the output tokens in the two-way transformer; its own hypernetwork MLP
(``hf_mlp``) reads upscaled features fused with an early encoder feature (``compress_vit_feat``) and
the image embedding (``embedding_encoder``). The decoder returns **one** mask per prompt: the best SAM
mask (by predicted IoU) plus the HQ mask, or the HQ mask alone (``hq_token_only``). See
``spec/hq_sam.md`` §4. Attribute names are the public checkpoint's keys (``mask_decoder.hf_token`` ...).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..config import MaskDecoderConfig
from .common import MLP, LayerNorm2d
from .mask_decoder import MaskDecoder

#: State-dict key prefixes (under ``mask_decoder.``) that only HQ-SAM has: the parameters that
#: ``--mode hq`` training updates.
HQ_KEY_PREFIXES = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")


def _upscale_x4(in_dim: int, mid_dim: int, out_dim: int) -> nn.Sequential:
    """Two stride-2 transposed convolutions with LayerNorm2d + GELU between (keys ``.0``, ``.1``, ``.3``)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_dim, mid_dim, kernel_size=2, stride=2),
        LayerNorm2d(mid_dim),
        nn.GELU(),
        nn.ConvTranspose2d(mid_dim, out_dim, kernel_size=2, stride=2),
    )


class HQMaskDecoder(MaskDecoder):
    """:class:`MaskDecoder` with the HQ output token and the HQ feature fusion.

    ``vit_dim`` is the channel count of the encoder's intermediate feature (the first global block's
    output for a ViT, TinyViT's second stage output).
    """

    #: The model hands this decoder the encoder's intermediate feature (see ``Sam.encode_image``).
    needs_interm = True

    def __init__(self, config: MaskDecoderConfig, *, vit_dim: int) -> None:
        super().__init__(config)
        dim = config.transformer_dim
        self.vit_dim = vit_dim
        self.hf_token = nn.Embedding(1, dim)
        self.hf_mlp = MLP(dim, dim, dim // 8, 3)
        self.compress_vit_feat = _upscale_x4(vit_dim, dim, dim // 8)
        self.embedding_encoder = _upscale_x4(dim, dim // 4, dim // 8)
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(dim // 8, dim // 4, kernel_size=3, stride=1, padding=1),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.Conv2d(dim // 4, dim // 8, kernel_size=3, stride=1, padding=1),
        )

    def output_token_weights(self) -> torch.Tensor:
        return torch.cat([super().output_token_weights(), self.hf_token.weight], dim=0)

    def hq_features(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor) -> torch.Tensor:
        """The prompt-independent HQ feature ``1 x C/8 x 4h x 4w`` of one image.

        Args:
            image_embeddings: ``1 x C x h x w`` (without the dense prompt embedding).
            interm_embeddings: ``1 x h x w x vit_dim`` encoder feature (channels last).
        """
        return self.embedding_encoder(image_embeddings) + self.compress_vit_feat(interm_embeddings.permute(0, 3, 1, 2))

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        *,
        interm_embeddings: Optional[torch.Tensor] = None,
        hq_features: Optional[torch.Tensor] = None,
        hq_token_only: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode ``B`` prompts into one mask each.

        Give the image's ``hq_features`` (from :meth:`hq_features`, computed once per image) or its
        ``interm_embeddings``. Returns low-res logits ``B x 1 x 4h x 4w`` (best SAM mask among 1..3 with
        ``multimask_output``, else mask 0; plus the HQ mask, or the HQ mask alone with
        ``hq_token_only``) and the selected SAM mask's predicted IoU ``B x 1``.
        """
        if hq_features is None:
            if interm_embeddings is None:
                raise ValueError("the HQ decoder needs the image's interm_embeddings or hq_features")
            hq_features = self.hq_features(image_embeddings, interm_embeddings)
        sam_masks, hq_mask, iou = self.predict_all(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                   dense_prompt_embeddings, hq_features)
        if multimask_output:
            iou, best = torch.max(iou[:, 1:], dim=1)
            iou = iou.unsqueeze(1)
            sam_mask = sam_masks[:, 1:][torch.arange(sam_masks.shape[0], device=best.device), best].unsqueeze(1)
        else:
            iou = iou[:, :1]
            sam_mask = sam_masks[:, :1]
        return (hq_mask if hq_token_only else sam_mask + hq_mask), iou

    def predict_all(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                    dense: torch.Tensor, hq_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM logits ``B x 4 x 4h x 4w``, HQ logits ``B x 1 x 4h x 4w`` and IoU predictions ``B x 4``."""
        hs, upscaled = self.attend(image_embeddings, image_pe, sparse, dense)
        n = self.num_mask_tokens
        mask_tokens_out = hs[:, 1 : 2 + n, :]
        hyper_sam = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        hyper_hq = self.hf_mlp(mask_tokens_out[:, n, :]).unsqueeze(1)
        upscaled_hq = self.embedding_maskfeature(upscaled) + hq_features
        b, c, h, w = upscaled.shape
        sam_masks = (hyper_sam @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        hq_mask = (hyper_hq @ upscaled_hq.reshape(b, c, h * w)).reshape(b, 1, h, w)
        return sam_masks, hq_mask, self.iou_prediction_head(hs[:, 0, :])


def hq_parameters(model: nn.Module):
    """The (name, parameter) pairs of the HQ parts of an HQ-SAM model (§7 of the spec)."""
    return [(name, p) for name, p in model.named_parameters()
            if name.startswith("mask_decoder.") and name.split(".")[1] in HQ_KEY_PREFIXES]
