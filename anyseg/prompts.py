"""Validation of prompts in the original image frame, shared by every predictor (torch-free).

Each check returns clean numpy arrays or raises a ``ValueError`` that says what was expected.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["ImageNotSetError", "float_rows", "check_points", "check_boxes", "check_mask_input"]


class ImageNotSetError(RuntimeError, ValueError):
    """A prediction was asked for before an image (or an image embedding) was set."""


def float_rows(value, name: str, width: int) -> np.ndarray:
    """``N x width`` (or one row of ``width``) finite numbers -> float64 ``N x width``."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == width:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"expected {name} of shape N x {width}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values: {arr.tolist()}")
    return arr


def check_points(point_coords, point_labels) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Validate ``N x 2`` XY points and ``N`` labels in {0, 1} -> (float64 coords, int64 labels)."""
    if point_coords is None and point_labels is None:
        return None, None
    together = "point_coords and point_labels must be given together"
    if point_coords is None:
        raise ValueError(f"point_labels were given without point_coords ({together})")
    if point_labels is None:
        raise ValueError(f"point_coords must come with point_labels: 1 = foreground, 0 = background ({together})")
    coords = float_rows(point_coords, "point_coords", 2)
    labels = np.asarray(point_labels)
    if labels.ndim != 1 or labels.shape[0] != coords.shape[0]:
        raise ValueError(f"expected {coords.shape[0]} point_labels (one per point), got shape {labels.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"point_labels must be 0 (background) or 1 (foreground), got {labels.tolist()}")
    return coords, labels.astype(np.int64)


def check_boxes(box) -> Optional[np.ndarray]:
    """Validate ``B x 4`` (or ``4``) XYXY boxes with x0 <= x1 and y0 <= y1 -> float64 ``B x 4``."""
    if box is None:
        return None
    boxes = float_rows(box, "box", 4)
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        raise ValueError(f"boxes must be X0,Y0,X1,Y1 with X1 >= X0 and Y1 >= Y0, got {boxes[bad].tolist()}")
    return boxes


def check_mask_input(mask_input, side: int) -> np.ndarray:
    """Low-res logits of a previous prediction, ``1 x side x side`` (or ``side x side``) -> float32."""
    arr = np.asarray(mask_input, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape != (1, side, side):
        raise ValueError(
            f"mask_input must be the 1 x {side} x {side} low-res logits of a previous prediction, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("mask_input contains NaN or infinite values")
    return arr
