"""Segment everything: prompt SAM with a grid of points (optionally over image crops) and keep the good,
distinct masks.

:class:`MaskGenerator` takes the parameters of the reference ``SamAutomaticMaskGenerator`` (which is
also exported under that name) and computes the same records, following ``spec/sam1.md`` section 7:

1. For each crop (layer 0 is the whole image), encode the crop and decode a grid of points in batches,
   one foreground point per prompt, three masks per point.
2. Per batch: keep predicted IoU > ``pred_iou_thresh``; keep stability >= ``stability_score_thresh``;
   binarise; box each mask; drop masks whose box touches an inner crop edge; encode as RLE in the
   full-image frame.
3. Per crop: box NMS by predicted IoU. Across crops: box NMS preferring smaller crops.
4. Optionally fill small holes / remove small islands, then NMS again preferring unchanged masks.

Memory stays bounded for large images: the predicted-IoU filter runs on the low-resolution logits
(the IoU does not depend on upscaling), and the surviving masks are upscaled to crop size a few at a
time, under a pixel budget, and kept only as run-length encodings. The records are identical to those
of upscaling every mask at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .geometry import coords_to_model_torch
from .masks import (
    batched_mask_to_box,
    box_area,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    nms,
    remove_small_regions,
    rle_counts,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from .predictor import SamPredictor
from .speed import get_config, ieee_float32_method

__all__ = ["MaskGenerator", "SamAutomaticMaskGenerator", "OUTPUT_MODES"]

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")

#: Default pixel budget for upscaling masks: about 32M mask pixels (float32 logits at crop size plus
#: the padded full-image masks) are alive at once, whatever the image size.
DEFAULT_MAX_CHUNK_PIXELS = 1 << 25


@dataclass
class _Proposals:
    """Mask proposals kept between steps. Masks live only as run lengths (full-image frame)."""

    rles: List[np.ndarray]  # column-major run lengths, one array per mask
    boxes: torch.Tensor  # N x 4 int64 XYXY, inclusive pixel indices
    iou_preds: torch.Tensor  # N float32
    points: torch.Tensor  # N x 2 float64 XY, the prompt point
    stability: torch.Tensor  # N float32
    crop_boxes: torch.Tensor  # N x 4 int64 XYXY, exclusive ends

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, idx: torch.Tensor) -> "_Proposals":
        """Keep (and reorder to) the proposals at int indices ``idx`` (or a bool mask)."""
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.cpu()
        return _Proposals(
            rles=[self.rles[i] for i in idx.tolist()],
            boxes=self.boxes[idx],
            iou_preds=self.iou_preds[idx],
            points=self.points[idx],
            stability=self.stability[idx],
            crop_boxes=self.crop_boxes[idx],
        )

    @staticmethod
    def empty() -> "_Proposals":
        return _Proposals(
            rles=[],
            boxes=torch.zeros(0, 4, dtype=torch.int64),
            iou_preds=torch.zeros(0, dtype=torch.float32),
            points=torch.zeros(0, 2, dtype=torch.float64),
            stability=torch.zeros(0, dtype=torch.float32),
            crop_boxes=torch.zeros(0, 4, dtype=torch.int64),
        )

    @staticmethod
    def cat(parts: Sequence["_Proposals"]) -> "_Proposals":
        parts = [_Proposals.empty(), *parts]
        return _Proposals(
            rles=[r for p in parts for r in p.rles],
            boxes=torch.cat([p.boxes for p in parts]),
            iou_preds=torch.cat([p.iou_preds for p in parts]),
            points=torch.cat([p.points for p in parts]),
            stability=torch.cat([p.stability for p in parts]),
            crop_boxes=torch.cat([p.crop_boxes for p in parts]),
        )


def _check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


class MaskGenerator:
    """Automatic mask generation ("segment everything") with a SAM model.

    Args:
        model: a :class:`~anyseg.modeling.Sam` (or a :class:`~anyseg.SamPredictor` wrapping one).
        points_per_side: grid points per image side for crop layer 0 (``n * n`` prompts); exactly one of
            ``points_per_side`` and ``point_grids`` must be given.
        points_per_batch: prompts decoded together (speed / memory trade-off, no effect on results).
        pred_iou_thresh: keep masks whose predicted IoU is above this (``<= 0`` disables the filter).
        stability_score_thresh: keep masks whose stability score is at least this (``<= 0`` disables).
        stability_score_offset: logit offset used for the stability score.
        box_nms_thresh: box IoU above which the lower-scoring mask of a crop is dropped.
        crop_n_layers: extra crop layers; layer ``i`` splits the image into ``2**i x 2**i`` crops.
        crop_nms_thresh: box IoU for removing duplicates across crops (smaller crops preferred).
        crop_overlap_ratio: overlap of neighbouring crops, as a fraction of the short image side at layer 1.
        crop_n_points_downscale_factor: layer ``i`` uses ``points_per_side / factor**i`` points per side.
        point_grids: explicit grids, one ``N_i x 2`` array in ``[0, 1]`` (XY, normalised) per crop layer.
        min_mask_region_area: fill holes and remove islands smaller than this many pixels (0 disables).
        output_mode: ``"binary_mask"`` (``H x W`` bool array), ``"uncompressed_rle"`` or ``"coco_rle"``.
        progress: show a tqdm progress bar over crops x batches.
        max_chunk_pixels: pixel budget for upscaling masks (keyword only); lower it to use less memory.
            Results do not depend on it.
        hq_token_only: HQ-SAM only (keyword only): decode with the HQ token's mask alone instead of the
            best SAM mask plus it. HQ-SAM gives one mask per grid point (SAM 1 gives three).
    """

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        progress: bool = False,
        *,
        max_chunk_pixels: int = DEFAULT_MAX_CHUNK_PIXELS,
        hq_token_only: bool = False,
    ) -> None:
        self.predictor = self._make_predictor(model)
        if hq_token_only and not getattr(self.predictor.model, "is_hq", False):
            raise ValueError("hq_token_only needs an HQ-SAM model (this one has no HQ token)")
        self.hq_token_only = bool(hq_token_only)
        self.crop_n_layers = _check_int("crop_n_layers", crop_n_layers, 0)
        self.crop_n_points_downscale_factor = _check_int(
            "crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1
        )
        if (points_per_side is None) == (point_grids is None):
            raise ValueError(
                "give exactly one of points_per_side and point_grids "
                f"(got points_per_side={points_per_side!r} and point_grids={'None' if point_grids is None else '...'})"
            )
        if points_per_side is not None:
            n = _check_int("points_per_side", points_per_side, 1)
            self.point_grids = build_all_layer_point_grids(n, self.crop_n_layers, self.crop_n_points_downscale_factor)
        else:
            self.point_grids = self._check_point_grids(point_grids)
        self.points_per_side = points_per_side
        self.points_per_batch = _check_int("points_per_batch", points_per_batch, 1)
        self.pred_iou_thresh = _check_number("pred_iou_thresh", pred_iou_thresh)
        self.stability_score_thresh = _check_number("stability_score_thresh", stability_score_thresh)
        self.stability_score_offset = _check_number("stability_score_offset", stability_score_offset, 0.0)
        self.box_nms_thresh = _check_number("box_nms_thresh", box_nms_thresh, 0.0, 1.0)
        self.crop_nms_thresh = _check_number("crop_nms_thresh", crop_nms_thresh, 0.0, 1.0)
        self.crop_overlap_ratio = _check_number("crop_overlap_ratio", crop_overlap_ratio, 0.0, 1.0)
        self.min_mask_region_area = _check_number("min_mask_region_area", min_mask_region_area, 0.0)
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}; got {output_mode!r}")
        self.output_mode = output_mode
        self.progress = bool(progress)
        self.max_chunk_pixels = _check_int("max_chunk_pixels", max_chunk_pixels, 1)

    #: dtype of the prompt points in crop pixels (it decides the exact ``point_coords`` of the records).
    _points_dtype = torch.float64
    #: whether a model with fast paths switched on may use :mod:`anyseg.fast.amg` for the batch step.
    _fast_batch = True

    @property
    def model(self):
        return self.predictor.model

    @property
    def _mask_threshold(self) -> float:
        """Logit threshold for binarising masks (and the centre of the stability score)."""
        return self.model.mask_threshold

    @staticmethod
    def _make_predictor(model):
        return model if isinstance(model, SamPredictor) else SamPredictor(model)

    def _check_point_grids(self, point_grids) -> List[np.ndarray]:
        if not isinstance(point_grids, (list, tuple)):
            raise ValueError(f"point_grids must be a list of N x 2 arrays (one per crop layer), got {type(point_grids).__name__}")
        if len(point_grids) != self.crop_n_layers + 1:
            raise ValueError(
                f"point_grids needs one grid per crop layer: {self.crop_n_layers + 1} for crop_n_layers="
                f"{self.crop_n_layers}, got {len(point_grids)}"
            )
        grids = []
        for i, grid in enumerate(point_grids):
            arr = np.asarray(grid, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
                raise ValueError(f"point_grids[{i}] must be an N x 2 array with N >= 1, got shape {arr.shape}")
            if not np.all((arr >= 0) & (arr <= 1)):
                raise ValueError(f"point_grids[{i}] must hold normalised XY in [0, 1]")
            grids.append(arr)
        return grids

    # ------------------------------------------------------------------------------------ public API
    @torch.inference_mode()
    @ieee_float32_method
    def generate(self, image) -> List[Dict[str, Any]]:
        """Segment everything in an image.

        Args:
            image: an ``H x W x 3`` uint8 RGB array (or a path, bytes or PIL image, decoded by
                :func:`anyseg.imageio.load_image`).
        Returns:
            one dict per mask, best first: ``segmentation`` (per ``output_mode``), ``area`` (int pixels),
            ``bbox`` (XYWH, image pixels), ``predicted_iou``, ``point_coords`` (``[[x, y]]`` image
            pixels), ``stability_score``, ``crop_box`` (XYWH, image pixels).
        """
        image = self._check_image(image)
        data = self._postprocess_small_regions(self._generate_masks(image), image.shape[:2])
        return self._records(data, image.shape[:2])

    # ------------------------------------------------------------------------------------- internals
    def _postprocess_small_regions(self, data: _Proposals, orig_size: Tuple[int, int]) -> _Proposals:
        if self.min_mask_region_area <= 0:
            return data
        return self._remove_small_regions(data, orig_size, self.min_mask_region_area,
                                          max(self.box_nms_thresh, self.crop_nms_thresh))

    @staticmethod
    def _check_image(image) -> np.ndarray:
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"expected an H x W x 3 uint8 RGB image, got an array of shape {image.shape} and dtype "
                    f"{image.dtype} (anyseg.imageio.load_image converts other arrays)"
                )
        else:
            from .imageio import load_image

            try:
                image = load_image(image)
            except TypeError as exc:
                raise ValueError(f"expected an H x W x 3 uint8 RGB image, a path, bytes or a PIL image: {exc}") from exc
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"the image is empty: shape {image.shape}")
        return image

    def _generate_masks(self, image: np.ndarray) -> _Proposals:
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        bar = None
        if self.progress:
            from tqdm import tqdm

            config = get_config(self.model)
            per_batch = self.points_per_batch
            if config is not None and config.amg_points_per_batch is not None:
                per_batch = int(config.amg_points_per_batch)
            total = sum(math.ceil(len(self.point_grids[i]) / per_batch) for i in layer_idxs)
            bar = tqdm(total=total, desc="segment everything", unit="batch")
        try:
            parts = [self._process_crop(image, box, layer, orig_size, bar) for box, layer in zip(crop_boxes, layer_idxs)]
        finally:
            if bar is not None:
                bar.close()
        data = _Proposals.cat(parts)
        if len(crop_boxes) > 1:
            # Prefer masks from smaller crops: score 1 / crop area (float32, as torch divides ints).
            scores = 1 / box_area(data.crop_boxes)
            data = data.select(nms(data.boxes.float(), scores, self.crop_nms_thresh))
        return data

    def _process_crop(self, image: np.ndarray, crop_box: List[int], layer_idx: int, orig_size: Tuple[int, int],
                      bar) -> _Proposals:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1, :])
        crop_size = (int(crop.shape[0]), int(crop.shape[1]))
        self.predictor.set_image(crop)
        # Grid in crop pixels, float64 as in the reference, so point_coords come out identical.
        points = self.point_grids[layer_idx] * np.array(crop_size, dtype=np.float64)[None, ::-1]
        parts = []
        config = get_config(self.model)
        batch = self.points_per_batch
        if config is not None and config.amg_points_per_batch is not None:
            batch = int(config.amg_points_per_batch)
        for start in range(0, len(points), batch):
            parts.append(self._process_batch(points[start : start + batch], crop_size, crop_box, orig_size))
            if bar is not None:
                bar.update(1)
        self._reset_predictor()

        data = _Proposals.cat(parts)
        data = data.select(nms(data.boxes.float(), data.iou_preds, self.box_nms_thresh))
        data.boxes = uncrop_boxes_xyxy(data.boxes, crop_box)
        data.points = uncrop_points(data.points, crop_box)
        return data

    def _reset_predictor(self) -> None:
        self.predictor.reset_image()

    def _decode_low_res(self, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``B x 2`` crop-pixel points -> low-res logits ``B x 3 x 256 x 256`` and IoU ``B x 3``.

        The same computation as ``SamPredictor.predict_torch(..., multimask_output=True)`` without the
        upscaling, which is done later, in chunks, only for the masks that pass the IoU filter.
        """
        predictor, model = self.predictor, self.predictor.model
        coords = coords_to_model_torch(points, predictor.original_size, model.img_size).to(model.device)
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int64, device=coords.device)
        sparse, dense = model.embed_prompts(points=(coords[:, None, :], labels), boxes=None, masks=None)
        features = predictor.features
        hq = {"hq_features": predictor.hq_features(), "hq_token_only": self.hq_token_only} if model.is_hq else {}
        low_res, iou = model.decode(features, sparse.to(features.dtype), dense.to(features.dtype), True, **hq)
        return low_res.float(), iou.float()

    def _upscale_low_res(self, low_res: torch.Tensor, crop_size: Tuple[int, int]) -> torch.Tensor:
        """``M x 256 x 256`` low-res logits -> ``M x h x w`` logits at crop size."""
        return self.model.postprocess_masks(low_res[:, None], self.predictor.input_size, crop_size)[:, 0]

    def _process_batch(self, points: np.ndarray, crop_size: Tuple[int, int], crop_box: List[int],
                       orig_size: Tuple[int, int]) -> _Proposals:
        config = get_config(self.model)
        fast = config is not None and (config.fast_decoder or config.fast_postprocess or config.amg_device_masks)
        # HQ-SAM decodes on the faithful path (the fast decoder has no HQ token).
        if fast and self._fast_batch and not getattr(self.model, "is_hq", False):
            from .fast.amg import process_batch

            return process_batch(self, points, crop_size, crop_box, orig_size)
        points_t = torch.as_tensor(points, dtype=self._points_dtype)
        low_res, iou = self._decode_low_res(points_t)
        k = low_res.shape[1]
        low_res = low_res.flatten(0, 1)  # the k masks of a point stay consecutive
        iou = iou.flatten(0, 1).cpu()
        points_t = points_t.repeat_interleave(k, dim=0)

        if self.pred_iou_thresh > 0.0:
            keep = (iou > self.pred_iou_thresh).nonzero().flatten()
            low_res, iou, points_t = low_res[keep.to(low_res.device)], iou[keep], points_t[keep]

        orig_h, orig_w = orig_size
        side = self.model.img_size
        per_mask_pixels = orig_h * orig_w + side * side  # padded full-image mask + the S x S upscale
        chunk = max(1, self.max_chunk_pixels // per_mask_pixels)
        parts = []
        for start in range(0, low_res.shape[0], chunk):
            sl = slice(start, start + chunk)
            parts.append(self._process_chunk(low_res[sl], iou[sl], points_t[sl], crop_size, crop_box, orig_size))
        return _Proposals.cat(parts)

    def _process_chunk(self, low_res: torch.Tensor, iou: torch.Tensor, points: torch.Tensor,
                       crop_size: Tuple[int, int], crop_box: List[int], orig_size: Tuple[int, int], *,
                       upscale=None, encode_rle=rle_counts) -> _Proposals:
        """Upscale ``M x 256 x 256`` low-res logits to the crop, filter, and run-length encode them.

        ``upscale`` (low-res logits -> crop-size logits) and ``encode_rle`` (full-image masks -> run
        lengths) default to the reference steps; fast paths pass equivalent replacements.
        """
        if upscale is None:
            logits = self._upscale_low_res(low_res, crop_size)
        else:
            logits = upscale(low_res)
        threshold = self._mask_threshold
        stability = calculate_stability_score(logits, threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            keep = (stability >= self.stability_score_thresh).nonzero().flatten()
            keep_cpu = keep.cpu()
            logits, iou, points, stability = logits[keep], iou[keep_cpu], points[keep_cpu], stability[keep]
        stability = stability.cpu()

        masks = logits > threshold
        del logits
        boxes = batched_mask_to_box(masks).cpu()
        orig_h, orig_w = orig_size
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            idx = keep.nonzero().flatten()
            masks, boxes, iou, points, stability = (
                masks[idx.to(masks.device)], boxes[idx], iou[idx], points[idx], stability[idx]
            )
        rles = encode_rle(uncrop_masks(masks, crop_box, orig_h, orig_w))
        return _Proposals(
            rles=rles,
            boxes=boxes,
            iou_preds=iou,
            points=points,
            stability=stability,
            crop_boxes=torch.tensor([list(crop_box)], dtype=torch.int64).expand(len(rles), 4),
        )

    @staticmethod
    def _remove_small_regions(data: _Proposals, orig_size: Tuple[int, int], min_area: float,
                              nms_thresh: float) -> _Proposals:
        """Fill small holes and remove small islands, then NMS preferring masks that did not change."""
        if len(data) == 0:
            return data
        h, w = orig_size
        new_rles: Dict[int, np.ndarray] = {}
        boxes = data.boxes.clone()
        scores = torch.ones(len(data), dtype=torch.float32)
        for i, counts in enumerate(data.rles):
            mask = rle_to_mask({"size": [h, w], "counts": counts})
            mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            if changed_holes or changed_islands:
                mask_t = torch.from_numpy(np.ascontiguousarray(mask))[None]
                boxes[i] = batched_mask_to_box(mask_t)[0]
                new_rles[i] = rle_counts(mask_t)[0]
                scores[i] = 0.0
        keep = nms(boxes.float(), scores, nms_thresh)
        # Masks that changed take their new encoding and box.
        data.rles = [new_rles.get(i, r) for i, r in enumerate(data.rles)]
        data.boxes = boxes
        return data.select(keep)

    def _records(self, data: _Proposals, orig_size: Tuple[int, int]) -> List[Dict[str, Any]]:
        h, w = orig_size
        records = []
        for i, counts in enumerate(data.rles):
            rle = {"size": [h, w], "counts": counts.tolist()}
            if self.output_mode == "coco_rle":
                segmentation: Any = coco_encode_rle(rle)
            elif self.output_mode == "binary_mask":
                segmentation = rle_to_mask(rle)
            else:
                segmentation = rle
            records.append(
                {
                    "segmentation": segmentation,
                    "area": int(counts[1::2].sum()),
                    "bbox": box_xyxy_to_xywh(data.boxes[i]).tolist(),
                    "predicted_iou": float(data.iou_preds[i]),
                    "point_coords": [data.points[i].tolist()],
                    "stability_score": float(data.stability[i]),
                    "crop_box": box_xyxy_to_xywh(data.crop_boxes[i]).tolist(),
                }
            )
        return records


#: The reference name, for code written against ``segment_anything``.
SamAutomaticMaskGenerator = MaskGenerator
