"""Resize-longest-side shapes and coordinate transforms (pure functions, one implementation).

Frames:
- *original*: pixels of the image the user gave, ``H x W``.
- *model*: the image resized so its long side is ``target`` (1024 for SAM), ``new_h x new_w``, top-left
  aligned inside the padded ``target x target`` square.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import numpy as np

if TYPE_CHECKING:  # torch stays optional here: the ONNX runtime uses this module without it
    import torch

MODEL_SIDE = 1024


def resized_shape(height: int, width: int, target: int = MODEL_SIDE) -> Tuple[int, int]:
    """Shape ``(new_h, new_w)`` of an ``height x width`` image resized so its long side is ``target``.

    Rounds half up, as the reference does: ``int(H * scale + 0.5)``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = target * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def coords_to_model(coords: np.ndarray, original_size: Tuple[int, int], target: int = MODEL_SIDE) -> np.ndarray:
    """Map ``... x 2`` XY points from the original frame to the model frame (float64 math, float32 out)."""
    h, w = original_size
    new_h, new_w = resized_shape(h, w, target)
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] = out[..., 0] * (new_w / w)
    out[..., 1] = out[..., 1] * (new_h / h)
    return out.astype(np.float32)


def boxes_to_model(boxes: np.ndarray, original_size: Tuple[int, int], target: int = MODEL_SIDE) -> np.ndarray:
    """Map ``... x 4`` XYXY boxes from the original frame to the model frame."""
    boxes = np.asarray(boxes, dtype=np.float64)
    out = coords_to_model(boxes.reshape(-1, 2, 2), original_size, target)
    return out.reshape(boxes.shape)


def coords_to_model_torch(coords: "torch.Tensor", original_size: Tuple[int, int], target: int = MODEL_SIDE) -> "torch.Tensor":
    """Torch version of :func:`coords_to_model`; keeps device, returns float32."""
    h, w = original_size
    new_h, new_w = resized_shape(h, w, target)
    import torch

    out = coords.to(torch.float64).clone()
    out[..., 0] = out[..., 0] * (new_w / w)
    out[..., 1] = out[..., 1] * (new_h / h)
    return out.to(torch.float32)


def boxes_to_model_torch(boxes: "torch.Tensor", original_size: Tuple[int, int], target: int = MODEL_SIDE) -> "torch.Tensor":
    """Torch version of :func:`boxes_to_model`."""
    out = coords_to_model_torch(boxes.reshape(-1, 2, 2), original_size, target)
    return out.reshape(boxes.shape)


def coords_from_model(coords: np.ndarray, original_size: Tuple[int, int], target: int = MODEL_SIDE) -> np.ndarray:
    """Inverse of :func:`coords_to_model`: model-frame XY back to original pixels."""
    h, w = original_size
    new_h, new_w = resized_shape(h, w, target)
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] = out[..., 0] * (w / new_w)
    out[..., 1] = out[..., 1] * (h / new_h)
    return out
