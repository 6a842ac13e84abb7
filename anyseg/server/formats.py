"""Mask and array encodings used by the HTTP API.

Masks leave the server in one of four formats (``MASK_FORMATS``):
- ``coco_rle``: COCO compressed RLE ``{"size": [H, W], "counts": str}`` (pycocotools);
- ``rle``: uncompressed column-major RLE ``{"size": [H, W], "counts": [int, ...]}``, counts starting
  with the number of leading zeros (easy to decode in a browser);
- ``png``: a base64 PNG, 8-bit grayscale, 255 = object;
- ``polygons``: ``[{"exterior": [[x, y], ...], "holes": [...]}, ...]`` in pixel-corner XY.
Float arrays travel as base64 of little-endian float32 bytes, with their shape alongside.
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

MASK_FORMATS = ("coco_rle", "rle", "png", "polygons")


def float32_to_b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def b64_to_float32(text: str, shape: Tuple[int, ...], what: str) -> np.ndarray:
    """Decode base64 little-endian float32 into ``shape``; ValueError naming ``what`` otherwise."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} must be base64-encoded float32 bytes: {exc}") from exc
    expected = int(np.prod(shape)) * 4
    if len(raw) != expected:
        raise ValueError(f"{what} must hold {'x'.join(map(str, shape))} float32 values ({expected} bytes), "
                         f"got {len(raw)} bytes")
    arr = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def mask_to_png_bytes(mask: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_masks(masks: np.ndarray, fmt: str, *, polygon_tolerance: float = 0.0) -> List[Any]:
    """``B x H x W`` bool masks -> one encoded mask per input, in format ``fmt``."""
    if fmt not in MASK_FORMATS:
        raise ValueError(f"mask format must be one of {', '.join(MASK_FORMATS)}, got {fmt!r}")
    masks = np.asarray(masks, dtype=bool)
    if fmt in ("coco_rle", "rle"):
        import torch

        from ..masks import coco_encode_rle, mask_to_rle

        rles = mask_to_rle(torch.from_numpy(masks))
        return [coco_encode_rle(r) for r in rles] if fmt == "coco_rle" else rles
    if fmt == "png":
        return [base64.b64encode(mask_to_png_bytes(m)).decode("ascii") for m in masks]
    from ..polygons import mask_to_polygons

    return [[p.to_dict() for p in mask_to_polygons(m, tolerance=polygon_tolerance)] for m in masks]


def mask_box_xywh(mask: np.ndarray) -> List[float]:
    """Tight XYWH box (pixels) of an ``H x W`` mask; zeros for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


def segmentation_to_mask(seg: Any, size: Tuple[int, int]) -> np.ndarray:
    """A client's segmentation -> ``H x W`` bool mask of the image's ``size``.

    Accepts an uncompressed RLE (counts a list), a COCO compressed RLE (counts a string) or a list of
    polygons (``{"exterior": ..., "holes": ...}`` dicts or flat COCO ``[x0, y0, x1, y1, ...]`` lists).
    """
    h, w = size
    if isinstance(seg, dict):
        if set(seg) != {"size", "counts"}:
            raise ValueError("an RLE segmentation must have exactly the keys 'size' and 'counts'")
        rle_size = seg["size"]
        if (not isinstance(rle_size, Sequence) or len(rle_size) != 2
                or [int(v) for v in rle_size] != [h, w]):
            raise ValueError(f"the segmentation size {rle_size!r} does not match the image size [{h}, {w}]")
        counts = seg["counts"]
        if isinstance(counts, str):
            from ..masks import coco_rle_to_mask

            try:
                return coco_rle_to_mask({"size": [h, w], "counts": counts}).astype(bool)
            except Exception as exc:
                raise ValueError(f"could not decode the COCO RLE counts: {exc}") from exc
        if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError("RLE counts must be a COCO string or a list of non-negative integers")
        from ..masks import rle_to_mask

        return rle_to_mask({"size": [h, w], "counts": counts})
    if isinstance(seg, list):
        from ..polygons import polygons_to_mask

        polys: List[Any] = []
        for p in seg:
            if isinstance(p, dict):
                polys.append(p)
            elif isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0:
                polys.append(np.asarray(p, dtype=np.float64).reshape(-1, 2))
            else:
                raise ValueError("a polygon must be {'exterior': [[x, y], ...]} or a flat [x0, y0, x1, y1, ...] list")
        try:
            return polygons_to_mask(polys, (h, w)).astype(bool)
        except (TypeError, KeyError) as exc:
            raise ValueError(f"could not read the polygons: {exc}") from exc
    raise ValueError("segmentation must be an RLE object or a list of polygons")


def mask_record(mask: np.ndarray) -> Dict[str, Any]:
    return {"area": int(mask.sum()), "bbox": mask_box_xywh(mask)}
