"""The helpers of the reference ``segment_anything.utils.amg`` module, under the same names.

Every mask and box function is :mod:`anyseg.masks`'s own (imported, not re-implemented), with the
reference's name where it differs (``mask_to_rle_pytorch``). Two pieces exist only for code written
against the reference and live here: :class:`MaskData`, the reference's column store of per-mask
values, and :func:`batch_iterator`.

Conventions (see :mod:`anyseg.masks`): boxes are XYXY; boxes computed from masks use inclusive pixel
indices; uncompressed RLE is column-major ``{"size": [h, w], "counts": [...]}``.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Generator, ItemsView, List

import numpy as np
import torch

from ..masks import (
    area_from_rle,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    build_point_grid,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)

__all__ = [
    "MaskData",
    "area_from_rle",
    "batch_iterator",
    "batched_mask_to_box",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle_pytorch",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]

#: ``B x H x W`` bool tensor -> list of uncompressed RLE dicts (the reference's name).
mask_to_rle_pytorch = mask_to_rle

_COLUMN_TYPES = (list, np.ndarray, torch.Tensor)


def batch_iterator(batch_size: int, *args) -> Generator[List[Any], None, None]:
    """Yield ``[a[i:i + batch_size] for a in args]`` over sequences of one common length; the last
    batch may be shorter."""
    if not args:
        raise ValueError("batch_iterator needs at least one sequence")
    n = len(args[0])
    lengths = [len(a) for a in args]
    if any(length != n for length in lengths):
        raise ValueError(f"batch_iterator needs sequences of one length, got lengths {lengths}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    for start in range(0, n, batch_size):
        yield [a[start:start + batch_size] for a in args]


class MaskData:
    """Per-mask values kept as columns of one length: lists, numpy arrays or tensors (or None).

    ``data["boxes"] = ...`` adds a column; :meth:`filter` keeps the same rows of every column;
    :meth:`cat` appends another ``MaskData``'s rows; :meth:`to_numpy` turns tensors into arrays.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._stats: Dict[str, Any] = {}
        for key, value in kwargs.items():
            self[key] = value

    @staticmethod
    def _check(key: str, value: Any) -> None:
        if value is not None and not isinstance(value, _COLUMN_TYPES):
            raise TypeError(f"MaskData column {key!r} must be a list, numpy array or torch tensor, "
                            f"got {type(value).__name__}")

    def __setitem__(self, key: str, value: Any) -> None:
        self._check(key, value)
        self._stats[key] = value

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep the rows selected by ``keep`` (a bool mask or integer indices), in every column."""
        keep_t = torch.as_tensor(keep)
        for key, value in self._stats.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                self._stats[key] = value[keep_t.to(value.device)]
            elif isinstance(value, np.ndarray):
                self._stats[key] = value[keep_t.detach().cpu().numpy()]
            elif keep_t.dtype == torch.bool:
                self._stats[key] = [item for item, kept in zip(value, keep_t.tolist()) if kept]
            else:
                self._stats[key] = [value[i] for i in keep_t.reshape(-1).tolist()]

    def cat(self, new_stats: "MaskData") -> None:
        """Append the rows of ``new_stats`` (same column kinds); a column missing here is copied in."""
        for key, value in new_stats.items():
            mine = self._stats.get(key)
            if mine is None:
                self._stats[key] = copy.deepcopy(value)
            elif isinstance(value, torch.Tensor):
                self._stats[key] = torch.cat([mine, value], dim=0)
            elif isinstance(value, np.ndarray):
                self._stats[key] = np.concatenate([mine, value], axis=0)
            elif isinstance(value, list):
                self._stats[key] = mine + copy.deepcopy(value)
            else:
                raise TypeError(f"MaskData column {key!r} of type {type(value).__name__} cannot be concatenated")

    def to_numpy(self) -> None:
        """Turn every tensor column into a numpy array (on the CPU)."""
        for key, value in self._stats.items():
            if isinstance(value, torch.Tensor):
                self._stats[key] = value.detach().cpu().numpy()
