"""Segment everything with SAM 2: :class:`SAM2AutomaticMaskGenerator`.

The parameters, defaults and records of the reference ``sam2.automatic_mask_generator`` (spec/sam2.md
section 10.1). The grid, crops, batching, filters, NMS, RLE and records are those of SAM 1's
:class:`~anyseg.automatic.MaskGenerator`, which this class extends; what SAM 2 changes:

- each crop is squashed to the model's square frame (:class:`~anyseg.SAM2ImagePredictor`), and the grid
  points (float32 crop pixels) go to that frame as ``x / w_crop * 1024, y / h_crop * 1024``;
- masks are the predictor's logits at crop size: the optional low-res clean-up (``min_mask_region_area``
  as the predictor's ``max_hole_area = max_sprinkle_area``, areas in 256 x 256 pixels), then bilinear
  straight to the crop; SAM 1's clean-up of the final masks is not run;
- the stability score is centred on ``mask_threshold`` and masks are ``logits > mask_threshold``;
- predicted IoUs are sigmoid outputs;
- ``multimask_output=False`` keeps one mask per point (token 0, or the dynamic fallback);
- ``use_m2m=True`` decodes every candidate again, before any filter, with its own point and its own
  low-res logits (clamped to [-32, 32]) as the mask prompt, single-mask output; the new mask and IoU
  replace the old ones.

As in SAM 1, the IoU filter runs on the low-res logits and only the survivors are upscaled, a few at a
time; the records are those of upscaling everything at once.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from .automatic import DEFAULT_MAX_CHUNK_PIXELS, MaskGenerator, _check_number
from .sam2_predictor import SAM2ImagePredictor

__all__ = ["SAM2AutomaticMaskGenerator"]

#: Keywords of the reference builders that ``from_pretrained`` passes on to the generator too; the
#: generator ignores them (any other unknown keyword is an error).
_BUILDER_KEYWORDS = frozenset({"config_file", "ckpt_path", "device", "mode", "hydra_overrides_extra",
                               "apply_postprocessing", "vos_optimized", "dtype"})


class SAM2AutomaticMaskGenerator(MaskGenerator):
    """Automatic mask generation ("segment everything") with a SAM 2 / 2.1 model.

    Args:
        model: a :class:`~anyseg.modeling.sam2.Sam2` (from :func:`anyseg.load_model`), or a
            :class:`~anyseg.SAM2ImagePredictor` wrapping one (only its model is used).
        points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
        stability_score_offset, box_nms_thresh, crop_n_layers, crop_nms_thresh, crop_overlap_ratio,
        crop_n_points_downscale_factor, point_grids, output_mode: as for
            :class:`~anyseg.automatic.MaskGenerator` (``pred_iou_thresh`` compares sigmoid IoUs).
        mask_threshold: logit threshold of the masks; the stability score uses it +- the offset.
        min_mask_region_area: fill background components and remove foreground components of at most
            this many pixels of the 256 x 256 low-res logits, before upscaling (0 disables).
        use_m2m: refine every candidate with a second decoder pass prompted by its own mask.
        multimask_output: three masks per point (True) or one.
        progress: show a tqdm progress bar over crops x batches.
        max_chunk_pixels: pixel budget for upscaling masks (keyword only); results do not depend on it.
    """

    _points_dtype = torch.float32  # as the reference, so point_coords are float32 values
    _fast_batch = False  # anyseg.fast.amg is SAM 1's batch step

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        use_m2m: bool = False,
        multimask_output: bool = True,
        progress: bool = False,
        *,
        max_chunk_pixels: int = DEFAULT_MAX_CHUNK_PIXELS,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - _BUILDER_KEYWORDS)
        if unknown:
            raise TypeError(f"SAM2AutomaticMaskGenerator got unexpected keyword argument(s): {', '.join(unknown)}")
        super().__init__(
            model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=point_grids,
            min_mask_region_area=min_mask_region_area,
            output_mode=output_mode,
            progress=progress,
            max_chunk_pixels=max_chunk_pixels,
        )
        self.mask_threshold = _check_number("mask_threshold", mask_threshold)
        for name, value in (("use_m2m", use_m2m), ("multimask_output", multimask_output)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.use_m2m = bool(use_m2m)
        self.multimask_output = bool(multimask_output)
        # The reference's predictor: default mask threshold, the region area as both clean-up limits.
        self.predictor.max_hole_area = self.min_mask_region_area
        self.predictor.max_sprinkle_area = self.min_mask_region_area

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs: Any) -> "SAM2AutomaticMaskGenerator":
        """Build from a Hugging Face hub id such as ``facebook/sam2.1-hiera-tiny``; the generator's own
        keywords go to the generator, the others to the model builder."""
        import inspect

        from .sam2_build import build_sam2_hf

        own = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "kwargs"}
        generator_kwargs = {k: v for k, v in kwargs.items() if k in own}
        builder_kwargs = {k: v for k, v in kwargs.items() if k not in own}
        return cls(build_sam2_hf(model_id, **builder_kwargs), **generator_kwargs)

    # ------------------------------------------------------------------------------------ hooks
    @staticmethod
    def _make_predictor(model) -> SAM2ImagePredictor:
        if isinstance(model, SAM2ImagePredictor):
            model = model.model
        return SAM2ImagePredictor(model)

    @property
    def _mask_threshold(self) -> float:
        return self.mask_threshold

    def _postprocess_small_regions(self, data, orig_size):
        return data  # done on the low-res logits by the predictor instead

    def _reset_predictor(self) -> None:
        self.predictor.reset_predictor()

    def _upscale_low_res(self, low_res: torch.Tensor, crop_size: Tuple[int, int]) -> torch.Tensor:
        return self.predictor.postprocess_masks(low_res[:, None], crop_size)[:, 0]

    def _decode_low_res(self, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``B x 2`` float32 crop-pixel points -> low-res logits ``B x k x 256 x 256`` (not clamped) and
        IoU ``B x k`` (k = 3, or 1 without multimask output), refined by the mask-to-mask pass if asked."""
        low_res, iou = self._decode(points, None, self.multimask_output)
        if not self.use_m2m:
            return low_res, iou
        b, k = iou.shape
        candidates = points.repeat_interleave(k, dim=0)
        prompts = torch.clamp(low_res.flatten(0, 1), -32.0, 32.0)[:, None]
        step = self.points_per_batch
        parts = [self._decode(candidates[s : s + step], prompts[s : s + step], False)
                 for s in range(0, candidates.shape[0], step)]
        refined = torch.cat([p[0] for p in parts]).reshape(b, k, *low_res.shape[-2:])
        return refined, torch.cat([p[1] for p in parts]).reshape(b, k)

    def _decode(self, points: torch.Tensor, mask_input: Optional[torch.Tensor],
                multimask_output: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass for ``B`` single-point prompts (crop pixels) against the current crop,
        optionally with ``B x 1 x 256 x 256`` mask logits; low-res logits and IoUs, float32."""
        predictor, model = self.predictor, self.predictor.model
        coords = predictor.transform_coords(points.to(model.device), True, predictor.original_size)
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int32, device=coords.device)
        # The faithful decoder, or the fast one when anyseg.speed switched it on for the model.
        return predictor.decode_low_res((coords[:, None, :], labels), mask_input, multimask_output)
