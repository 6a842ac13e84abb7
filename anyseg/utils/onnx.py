"""``SamOnnxModel``: the reference's ONNX export module, as :class:`anyseg.export.decoder.SamOnnxDecoder`.

Code written for the reference exports the prompt encoder + mask decoder like this (see
``docs/compat.md``)::

    onnx_model = SamOnnxModel(sam, return_single_mask=True)
    torch.onnx.export(onnx_model, tuple(dummy_inputs.values()), "decoder.onnx", dynamo=False,
                      input_names=list(dummy_inputs), output_names=["masks", "iou_predictions",
                      "low_res_masks"], dynamic_axes={"point_coords": {1: "num_points"},
                      "point_labels": {1: "num_points"}}, opset_version=17, do_constant_folding=True)

The module is ``anyseg export``'s decoder module (same inputs, outputs and computation, so the same
graph); this subclass only adds the reference's keyword-argument ``forward`` and its
``return_extra_metrics`` outputs.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..export.decoder import SamOnnxDecoder
from ..masks import calculate_stability_score

__all__ = ["SamOnnxModel"]


class SamOnnxModel(SamOnnxDecoder):
    """Prompt encoder + mask decoder + mask postprocessing of ``model`` as one exportable module.

    Args:
        model: a SAM model (:class:`anyseg.Sam`); its prompt encoder and mask decoder are copied, so
            the model itself is left untouched.
        return_single_mask: one mask per prompt, chosen as the reference chooses it (the best-scored
            multimask output for a single click or a box alone, else the single-mask output).
        use_stability_score: report the stability score of each low-res mask instead of the
            predicted IoU.
        return_extra_metrics: also return the stability score and the pixel area of each upscaled
            mask: outputs ``(masks, scores, stability_scores, areas, low_res_masks)``.

    Inputs of :meth:`forward` (float32): ``image_embeddings 1 x 256 x 64 x 64``, ``point_coords
    1 x N x 2`` (model frame, e.g. ``predictor.transform.apply_coords``), ``point_labels 1 x N``,
    ``mask_input 1 x 1 x 256 x 256``, ``has_mask_input 1``, ``orig_im_size 2`` (H, W).
    """

    def __init__(self, model, return_single_mask: bool, use_stability_score: bool = False,
                 return_extra_metrics: bool = False) -> None:
        super().__init__(model, return_single_mask=bool(return_single_mask),
                         use_stability_score=bool(use_stability_score))
        self.return_extra_metrics = bool(return_extra_metrics)

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor,
                orig_im_size: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``(masks 1 x k x H x W logits, scores 1 x k, low_res_masks 1 x k x 256 x 256)``, or with
        ``return_extra_metrics`` ``(masks, scores, stability_scores 1 x k, areas 1 x k, low_res_masks)``."""
        masks, scores, low_res = super().forward(image_embeddings, point_coords, point_labels, mask_input,
                                                 has_mask_input, orig_im_size)
        if not self.return_extra_metrics:
            return masks, scores, low_res
        stability = calculate_stability_score(masks, self.mask_threshold, self.stability_score_offset)
        areas = (masks > self.mask_threshold).sum(-1).sum(-1)
        return masks, scores, stability, areas, low_res
