"""Mask decoder: output tokens + prompt tokens attend with the image embedding, then hypernetwork
MLPs turn the mask tokens into per-pixel weights over upscaled image features."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..config import MaskDecoderConfig
from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    def __init__(self, config: MaskDecoderConfig, *, mlp_layers: bool = False, iou_sigmoid: bool = False) -> None:
        """``mlp_layers`` and ``iou_sigmoid`` are SAM 2's variants (transformer MLP keys, sigmoid IoU head)."""
        super().__init__()
        dim = config.transformer_dim
        self.transformer_dim = dim
        self.num_multimask_outputs = config.num_multimask_outputs
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(depth=config.depth, dim=dim, num_heads=config.num_heads,
                                             mlp_dim=config.mlp_dim,
                                             downsample_rate=config.attention_downsample_rate,
                                             mlp_layers=mlp_layers)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(dim, config.iou_head_hidden_dim, self.num_mask_tokens,
                                       config.iou_head_depth, sigmoid_output=iou_sigmoid)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode ``B`` prompts. The parameter names are the reference's, so code written for
        ``segment_anything`` may pass them by keyword.

        Args:
            image_embeddings: ``1 x C x h x w`` (shared by every prompt) or ``B x C x h x w``.
            image_pe: ``1 x C x h x w`` dense positional encoding.
            sparse_prompt_embeddings: ``B x T x C`` prompt tokens.
            dense_prompt_embeddings: ``B x C x h x w``.
        Returns:
            low-res mask logits ``B x k x 4h x 4w`` and predicted IoU ``B x k``; k = 3 with
            ``multimask_output`` (masks 1..3), else 1 (mask 0).
        """
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                        dense_prompt_embeddings)
        if multimask_output:
            return masks[:, 1:], iou[:, 1:]
        return masks[:, :1], iou[:, :1]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hs, upscaled = self.attend(image_embeddings, image_pe, sparse, dense)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(hs[:, 0, :])

    def output_token_weights(self) -> torch.Tensor:
        """The learned output tokens ``k x C`` that precede the prompt tokens (HQ-SAM appends one)."""
        return torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)

    def attend(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
               dense: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Two-way transformer over output + prompt tokens and the image: token outputs ``B x T x C``
        and the upscaled image features ``B x C/8 x 4h x 4w``."""
        b = sparse.shape[0]
        output_tokens = self.output_token_weights()
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"expected 1 or {b} image embeddings for {b} prompts, got {image_embeddings.shape[0]}"
            )
        src = image_embeddings + dense
        pos = image_pe.expand(b, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)
        _, c, h, w = dense.shape
        src = src.transpose(1, 2).reshape(b, c, h, w)
        return hs, self.output_upscaling(src)
