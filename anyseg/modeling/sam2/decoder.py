"""SAM 2 mask decoder (spec/sam2.md section 4): SAM 1's decoder with an object-score token, upscaling
that adds the high-resolution features, a sigmoid IoU head and the dynamic multimask fallback."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ...config import MaskDecoderConfig
from ...config_sam2 import Sam2Config
from ..common import MLP
from ..mask_decoder import MaskDecoder


class DecoderOutput(NamedTuple):
    """masks: low-res logits ``B x k x 256 x 256``; iou: ``B x k``; tokens: the mask tokens behind the
    chosen outputs ``B x k' x 256`` (for the object pointer); object_score: ``B x 1`` logits."""

    masks: torch.Tensor
    iou: torch.Tensor
    tokens: torch.Tensor
    object_score: torch.Tensor


class Sam2MaskDecoder(MaskDecoder):
    """Keys ``sam_mask_decoder.*``: SAM 1's plus ``obj_score_token``, ``pred_obj_score_head``,
    ``conv_s0`` / ``conv_s1``."""

    def __init__(self, config: Sam2Config) -> None:
        dec = MaskDecoderConfig(transformer_dim=config.transformer_dim, depth=config.decoder_depth,
                                num_heads=config.decoder_heads, mlp_dim=config.decoder_mlp_dim,
                                num_multimask_outputs=config.num_multimask_outputs,
                                iou_head_depth=config.iou_head_depth, iou_head_hidden_dim=config.iou_head_hidden_dim)
        super().__init__(dec, mlp_layers=True, iou_sigmoid=config.iou_prediction_use_sigmoid)
        dim = config.transformer_dim
        self.pred_obj_scores = config.pred_obj_scores
        if self.pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, dim)
            if config.pred_obj_scores_mlp:
                self.pred_obj_score_head = MLP(dim, dim, 1, 3)
            else:
                self.pred_obj_score_head = nn.Linear(dim, 1)
        self.use_high_res_features = config.use_high_res_features_in_sam
        if self.use_high_res_features:
            self.conv_s0 = nn.Conv2d(dim, dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(dim, dim // 4, kernel_size=1)
        self.dynamic_multimask = config.dynamic_multimask_via_stability
        self.stability_delta = config.dynamic_multimask_stability_delta
        self.stability_thresh = config.dynamic_multimask_stability_thresh
        self.use_multimask_token_for_obj_ptr = config.use_multimask_token_for_obj_ptr

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: Optional[bool] = None,
        high_res_features: Optional[Sequence[torch.Tensor]] = None,
    ) -> DecoderOutput:
        """Decode ``B`` prompts against one image (``1 x C x h x w``, repeated) or ``B`` images.

        The parameter names and order are the reference's (``sam2``), so code written for it may pass
        them by keyword. ``sparse_prompt_embeddings``: ``B x T x C``; ``dense_prompt_embeddings``:
        ``B x C x h x w``. ``repeat_image``: the reference's switch between one image for every prompt
        (True) and one image per prompt (False); here both layouts are recognised from the batch size,
        so None accepts either, True requires a single image and False ``B`` images.
        ``high_res_features``: ``[B' x 32 x 4h x 4w, B' x 64 x 2h x 2w]`` (B' = 1 or B).
        With ``multimask_output`` masks 1..3; else mask 0, or under the dynamic fallback the best of
        1..3 when mask 0 is unstable. Returns a :class:`DecoderOutput`, which unpacks as the
        reference's ``(masks, iou_pred, sam_tokens_out, object_score_logits)``.
        """
        b, n = sparse_prompt_embeddings.shape[0], image_embeddings.shape[0]
        if repeat_image is not None and n != (1 if repeat_image else b):
            raise ValueError(f"repeat_image={repeat_image} expects {1 if repeat_image else b} image embeddings "
                             f"for {b} prompts, got {n}")
        masks, iou, mask_tokens, object_score = self.predict_all(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                                  dense_prompt_embeddings, high_res_features)
        if multimask_output:
            masks, iou = masks[:, 1:], iou[:, 1:]
        elif self.dynamic_multimask and not self.training:
            masks, iou = self.dynamic_fallback(masks, iou)
        else:
            masks, iou = masks[:, :1], iou[:, :1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            tokens = mask_tokens[:, 1:]
        else:
            tokens = mask_tokens[:, :1]
        return DecoderOutput(masks, iou, tokens, object_score)

    def predict_all(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                    dense: torch.Tensor, high_res_features: Optional[Sequence[torch.Tensor]]):
        """All four masks ``B x 4 x 4h x 4w``, IoU ``B x 4``, mask tokens ``B x 4 x C``, object score ``B x 1``."""
        b = sparse.shape[0]
        parts = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            parts.insert(0, self.obj_score_token.weight)
        s = 1 if self.pred_obj_scores else 0
        output_tokens = torch.cat(parts, dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(f"expected 1 or {b} image embeddings for {b} prompts, got {image_embeddings.shape[0]}")
        src = image_embeddings + dense
        if src.shape[0] != b:
            src = src.expand(b, -1, -1, -1)
        pos = image_pe.expand(b, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1 : s + 1 + self.num_mask_tokens, :]

        _, c, h, w = dense.shape
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.upscale(src, high_res_features)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score = self.pred_obj_score_head(hs[:, 0, :])
        else:
            object_score = 10.0 * iou.new_ones(iou.shape[0], 1)
        return masks, iou, mask_tokens_out, object_score

    def upscale(self, src: torch.Tensor, high_res_features: Optional[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``B x C x h x w`` transformer output -> ``B x C/8 x 4h x 4w``, adding the high-res maps."""
        if not self.use_high_res_features:
            return self.output_upscaling(src)
        if high_res_features is None:
            raise ValueError("this SAM 2 decoder needs the image's high-resolution features")
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        x = act1(norm(conv1(src) + feat_s1))
        return act2(conv2(x) + feat_s0)

    def stability(self, logits: torch.Tensor) -> torch.Tensor:
        """``|logits > delta| / |logits > -delta|`` per mask (1 where the denominator is 0)."""
        flat = logits.flatten(-2)
        inter = (flat > self.stability_delta).sum(-1).float()
        union = (flat > -self.stability_delta).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))

    def dynamic_fallback(self, masks: torch.Tensor, iou: torch.Tensor):
        """Mask 0 when it is stable, else the best of masks 1..3 by predicted IoU (``B x 1`` each)."""
        multi, multi_iou = masks[:, 1:], iou[:, 1:]
        best = multi_iou.argmax(dim=-1)
        rows = torch.arange(multi.shape[0], device=masks.device)
        best_masks = multi[rows, best].unsqueeze(1)
        best_iou = multi_iou[rows, best].unsqueeze(1)
        single, single_iou = masks[:, :1], iou[:, :1]
        stable = self.stability(single) >= self.stability_thresh
        out_masks = torch.where(stable[..., None, None].expand_as(single), single, best_masks)
        out_iou = torch.where(stable.expand_as(single_iou), single_iou, best_iou)
        return out_masks, out_iou
