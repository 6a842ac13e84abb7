"""Pure helpers for masks and boxes: point grids, crops, boxes, stability, RLE, NMS, small regions.

Conventions used throughout:
- Boxes are ``XYXY`` (``x0, y0, x1, y1``). Boxes computed from masks use *inclusive* pixel indices
  (a single pixel at ``(x, y)`` has box ``(x, y, x, y)``); crop boxes use exclusive ends
  (``image[y0:y1, x0:x1]``).
- Masks are ``H x W`` (or ``B x H x W``) booleans, row-major, in the frame the docstring names.
- Uncompressed RLE is column-major (Fortran order, as COCO): ``{"size": [h, w], "counts": [...]}``
  where ``counts`` alternate runs of 0s and 1s and always start with a run of 0s (of length 0 when
  the first pixel is set).

Batched work (many masks at once) is in torch; per-mask work (RLE decoding, connected components) is in
numpy. Nothing here knows about models.
"""
from __future__ import annotations

import math
import warnings
from itertools import product
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "build_point_grid",
    "build_all_layer_point_grids",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "uncrop_boxes_xyxy",
    "uncrop_points",
    "uncrop_masks",
    "batched_mask_to_box",
    "calculate_stability_score",
    "mask_to_rle",
    "rle_to_mask",
    "area_from_rle",
    "coco_encode_rle",
    "coco_rle_to_mask",
    "box_xyxy_to_xywh",
    "box_area",
    "box_iou",
    "nms",
    "remove_small_regions",
]

Rle = Dict[str, Any]

# --------------------------------------------------------------------------------------------------
# Point grids and crops
# --------------------------------------------------------------------------------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
    """A regular grid of ``n_per_side**2`` points in the unit square.

    Returns ``(n*n, 2)`` float64 XY in ``[0, 1]``: coordinates ``(k + 0.5) / n`` for ``k = 0..n-1``,
    x varying fastest (row-major over y). Raises ``ValueError`` when ``n_per_side < 1``.
    """
    n = int(n_per_side)
    if n < 1:
        raise ValueError(f"a point grid needs at least 1 point per side, got {n_per_side}")
    offset = 1.0 / (2 * n)
    # linspace (not (k + 0.5) / n) reproduces the reference coordinates to the last bit.
    one_side = np.linspace(offset, 1.0 - offset, n)
    xs = np.tile(one_side[None, :], (n, 1))
    ys = np.tile(one_side[:, None], (1, n))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """Point grids for crop layers ``0..n_layers``; layer ``i`` has ``int(n_per_side / scale_per_layer**i)``
    points per side.

    Returns a list of ``n_layers + 1`` arrays of shape ``(n_i * n_i, 2)`` in ``[0, 1]``. Raises
    ``ValueError`` if any layer would get fewer than one point per side.
    """
    if n_layers < 0:
        raise ValueError(f"n_layers must be >= 0, got {n_layers}")
    grids = []
    for i in range(n_layers + 1):
        n_points = int(n_per_side / (scale_per_layer**i))
        if n_points < 1:
            raise ValueError(
                f"crop layer {i} would have int({n_per_side} / {scale_per_layer}**{i}) = {n_points} points per "
                "side; use more points per side, fewer crop layers or a smaller downscale factor"
            )
        grids.append(build_point_grid(n_points))
    return grids


def generate_crop_boxes(
    im_size: Tuple[int, int], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """Crop boxes for a ``(h, w)`` image: layer 0 is the whole image, layer ``i >= 1`` is a ``2**i x 2**i``
    grid of overlapping crops.

    Returns ``(boxes, layer_idxs)``: ``boxes`` a list of ``[x0, y0, x1, y1]`` int boxes in image pixels
    (exclusive ends), ``layer_idxs`` the layer of each box. Within a layer the x starts form the outer
    loop and the y starts the inner loop.
    """
    im_h, im_w = int(im_size[0]), int(im_size[1])
    short_side = min(im_h, im_w)
    boxes: List[List[int]] = [[0, 0, im_w, im_h]]
    layer_idxs: List[int] = [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        x_starts = [int((crop_w - overlap) * k) for k in range(n_crops_per_side)]
        y_starts = [int((crop_h - overlap) * k) for k in range(n_crops_per_side)]
        for x0, y0 in product(x_starts, y_starts):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return boxes, layer_idxs


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift ``... x 4`` XYXY boxes from crop pixels to image pixels (adds the crop origin)."""
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    offset = torch.tensor([x0, y0, x0, y0], device=boxes.device)
    return boxes + offset


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift ``... x 2`` XY points from crop pixels to image pixels (adds the crop origin)."""
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    offset = torch.tensor([x0, y0], device=points.device)
    return points + offset


def uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Zero-pad ``... x h x w`` crop masks back to ``... x orig_h x orig_w`` image masks.

    ``crop_box`` is the crop's ``[x0, y0, x1, y1]`` in image pixels with ``(y1 - y0, x1 - x0) == (h, w)``.
    Returns ``masks`` itself when the crop is the whole image.
    """
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """Which boxes touch a crop edge that is not also an image edge.

    ``boxes`` is ``N x 4`` XYXY in crop pixels; ``crop_box`` and ``orig_box`` (usually
    ``[0, 0, W, H]``) are XYXY in image pixels. A coordinate is "near" an edge when it lies within
    ``atol`` pixels of it. Returns an ``N`` bool tensor.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


# --------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes around ``... x H x W`` bool masks.

    Returns ``... x 4`` int64 XYXY with inclusive pixel indices (``x1``/``y1`` are the last set
    column/row); an empty mask gives ``0, 0, 0, 0``.
    """
    *batch, h, w = masks.shape
    if masks.numel() == 0:
        return torch.zeros(*batch, 4, dtype=torch.int64, device=masks.device)
    flat = masks.reshape(-1, h, w).bool()

    def edges(occupied: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # occupied: M x length, whether any pixel is set in that row / column.
        coords = torch.arange(length, device=occupied.device)[None, :] * occupied
        last = coords.max(dim=-1).values
        first = (coords + length * ~occupied).min(dim=-1).values
        return first, last

    top, bottom = edges(flat.any(dim=-1), h)
    left, right = edges(flat.any(dim=-2), w)
    empty = (right < left) | (bottom < top)
    out = torch.stack([left, top, right, bottom], dim=-1) * ~empty[:, None]
    return out.reshape(*batch, 4)


def box_xyxy_to_xywh(box: Any) -> Any:
    """``[x0, y0, x1, y1]`` -> ``[x0, y0, x1 - x0, y1 - y0]`` for a list, array or tensor (``... x 4``).

    Returns a new object of the same kind; the input is not modified.
    """
    if isinstance(box, torch.Tensor):
        out = box.clone()
    elif isinstance(box, np.ndarray):
        out = box.copy()
    else:
        x0, y0, x1, y1 = box
        return [x0, y0, x1 - x0, y1 - y0]
    out[..., 2] = out[..., 2] - out[..., 0]
    out[..., 3] = out[..., 3] - out[..., 1]
    return out


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas ``(x1 - x0) * (y1 - y0)`` of ``... x 4`` XYXY boxes (no +1), in the boxes' dtype."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``N x 4`` and ``M x 4`` XYXY boxes -> ``N x M`` (areas without +1)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression.

    ``boxes`` is ``N x 4`` XYXY, ``scores`` is ``N``. Boxes are visited by descending score with a
    stable sort (ties keep their input order); each kept box suppresses every later box whose IoU with it
    is ``> iou_threshold``. IoU is computed in float32 with areas ``(x1 - x0) * (y1 - y0)``.
    Returns the int64 indices of the kept boxes, by descending score.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"nms expects N x 4 boxes, got shape {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms expects one score per box: {boxes.shape[0]} boxes, scores shape {tuple(scores.shape)}")
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes.detach().float().cpu().numpy()[order.cpu().numpy()]
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x1 - x0) * (y1 - y0)
    threshold = np.float32(iou_threshold)
    suppressed = np.zeros(n, dtype=bool)
    kept = []
    for i in range(n):
        if suppressed[i]:
            continue
        kept.append(i)
        rest = slice(i + 1, n)
        w = np.maximum(np.float32(0), np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
        h = np.maximum(np.float32(0), np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        # NaN (two empty boxes) compares False, so such boxes are never suppressed.
        suppressed[rest] |= iou > threshold
    return order[torch.as_tensor(kept, dtype=torch.int64, device=order.device)]


# --------------------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------------------


def calculate_stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """Stability of ``... x H x W`` mask logits under a threshold shift.

    ``|logits > mask_threshold + offset| / |logits > mask_threshold - offset|``, pixel counts in int32,
    the ratio in float32. Returns ``...`` (one score per mask); a mask with no pixel above the lower
    threshold gives NaN.
    """
    high = (logits > (mask_threshold + offset)).sum(-1, dtype=torch.int32).sum(-1, dtype=torch.int32)
    low = (logits > (mask_threshold - offset)).sum(-1, dtype=torch.int32).sum(-1, dtype=torch.int32)
    return high / low


# --------------------------------------------------------------------------------------------------
# Run-length encoding
# --------------------------------------------------------------------------------------------------


def rle_counts(masks: torch.Tensor) -> List[np.ndarray]:
    """Column-major run lengths of ``B x H x W`` bool masks, one numpy array per mask.

    Same ``counts`` as :func:`mask_to_rle`, kept as arrays (compact when many masks are held): uint32
    while ``H * W`` fits in it (every image below 4 gigapixels), int64 beyond.
    """
    if masks.ndim != 3:
        raise ValueError(f"expected B x H x W masks, got shape {tuple(masks.shape)}")
    b, h, w = masks.shape
    if h * w == 0:
        return [np.zeros(1, dtype=np.int64) for _ in range(b)]
    dtype = np.uint32 if h * w < 2**32 else np.int64
    flat = masks.bool().transpose(1, 2).reshape(b, h * w).cpu()
    # Index j+1 starts a new run when pixel j and j+1 differ.
    rows, cols = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
    per_mask = torch.bincount(rows, minlength=b).tolist()
    starts = np.split((cols + 1).numpy(), np.cumsum(per_mask)[:-1])
    first_set = flat[:, 0].tolist()
    out = []
    for i in range(b):
        bounds = np.concatenate(([0], starts[i], [h * w]))
        counts = np.diff(bounds)
        if first_set[i]:
            counts = np.concatenate(([0], counts))
        out.append(counts.astype(dtype))
    return out


def mask_to_rle(masks: torch.Tensor) -> List[Rle]:
    """Encode ``B x H x W`` bool masks as uncompressed column-major RLE dicts.

    Returns ``B`` dicts ``{"size": [H, W], "counts": [int, ...]}``; ``counts`` starts with the number
    of leading zeros (0 when the first pixel is set).
    """
    masks = torch.as_tensor(masks)
    h, w = int(masks.shape[-2]), int(masks.shape[-1])
    return [{"size": [h, w], "counts": counts.tolist()} for counts in rle_counts(masks)]


def rle_to_mask(rle: Rle) -> np.ndarray:
    """Decode an uncompressed column-major RLE dict into an ``H x W`` bool numpy array."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected h * w = {h} * {w} = {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T


def area_from_rle(rle: Rle) -> int:
    """Number of set pixels of an uncompressed RLE dict."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(uncompressed_rle: Rle) -> Rle:
    """Uncompressed RLE -> COCO compressed RLE ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    from pycocotools import mask as mask_utils

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(
        {"size": [int(h), int(w)], "counts": [int(c) for c in uncompressed_rle["counts"]]}, int(h), int(w)
    )
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def coco_rle_to_mask(rle: Rle) -> np.ndarray:
    """Decode a COCO compressed RLE (``counts`` str or bytes) into an ``H x W`` bool numpy array."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("utf-8")
    h, w = rle["size"]
    with warnings.catch_warnings():
        # pycocotools' Cython array wrapper predates numpy 2's copy keyword; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = mask_utils.decode({"size": [int(h), int(w)], "counts": counts})
    return decoded.astype(bool)


# --------------------------------------------------------------------------------------------------
# Small regions
# --------------------------------------------------------------------------------------------------

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill small holes in, or remove small islands from, an ``H x W`` bool mask.

    Components are 8-connected. ``mode="holes"``: components of the inverted mask with fewer than
    ``area_thresh`` pixels are set. ``mode="islands"``: components of the mask with fewer than
    ``area_thresh`` pixels are cleared; if that would clear all of them, the largest is kept.
    Returns ``(new_mask, changed)``; ``new_mask`` is ``mask`` itself when nothing changed.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    fill_holes = mode == "holes"
    working = ~mask if fill_holes else mask
    labels, n_labels = ndimage.label(working, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    if fill_holes:
        return mask | np.isin(labels, small), True
    keep = np.flatnonzero(sizes >= area_thresh) + 1
    if keep.size == 0:
        # Labels are numbered in raster order, so ties go to the component met first.
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, keep), True


def small_components(mask: torch.Tensor, max_area: float) -> torch.Tensor:
    """Pixels of ``mask`` (bool, ``... x H x W``) lying in 8-connected components of at most ``max_area``
    pixels, per ``H x W`` plane (SAM 2's hole filling and sprinkle removal on low-res logits)."""
    planes = mask.detach().cpu().numpy().astype(bool).reshape(-1, *mask.shape[-2:])
    out = np.zeros_like(planes)
    for i, plane in enumerate(planes):
        labels, n = ndimage.label(plane, structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes <= max_area
        small[0] = False
        out[i] = small[labels]
    return torch.from_numpy(out.reshape(mask.shape)).to(mask.device)


def fill_holes_in_logits(logits: torch.Tensor, max_area: float, *, threshold: float = 0.0,
                         fill: float = 0.1) -> torch.Tensor:
    """Set background components (``logits <= threshold``) of at most ``max_area`` pixels to ``fill``
    (SAM 2 video: ``fill_hole_area``; ``... x H x W`` logits)."""
    if max_area <= 0:
        return logits
    holes = small_components(logits <= threshold, max_area)
    return torch.where(holes, torch.as_tensor(fill, dtype=logits.dtype, device=logits.device), logits)
