"""``ResizeLongestSide``: the reference resize-and-rescale helper, over :mod:`anyseg.geometry`.

The shapes and the coordinate maps are :mod:`anyseg.geometry`'s functions (one implementation for
the whole package); this class only gives them the reference's names and argument order. Frames as
in :mod:`anyseg.geometry`: *original* pixels ``H x W`` and the *model* frame, the image resized so
its long side is ``target_length``.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..geometry import boxes_to_model, boxes_to_model_torch, coords_to_model, coords_to_model_torch, resized_shape

__all__ = ["ResizeLongestSide"]


class ResizeLongestSide:
    """Resize images so their long side is ``target_length``; move points and boxes along.

    Differences from the reference, all in dtype only: the numpy coordinate methods return float32
    (the reference returns float64; the values are the same float64 products, rounded as the model
    receives them), and the torch ones compute in float64 before returning float32.
    """

    def __init__(self, target_length: int) -> None:
        if int(target_length) <= 0:
            raise ValueError(f"target_length must be positive, got {target_length!r}")
        self.target_length = int(target_length)

    def __repr__(self) -> str:
        return f"ResizeLongestSide(target_length={self.target_length})"

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        """``(new_h, new_w)`` of an ``oldh x oldw`` image whose long side becomes ``long_side_length``."""
        return resized_shape(int(oldh), int(oldw), int(long_side_length))

    # ------------------------------------------------------------------------------------- images
    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``H x W x C`` uint8 array -> ``h x w x C`` uint8 array, resized with PIL's bilinear filter
        (what :class:`anyseg.SamPredictor` feeds the encoder)."""
        image = np.asarray(image)
        if image.ndim not in (2, 3):
            raise ValueError(f"apply_image expects an H x W x C array, got shape {image.shape}")
        new_h, new_w = resized_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` float tensor -> ``B x C x h x w`` (antialiased bilinear, as the reference)."""
        if image.ndim != 4:
            raise ValueError(f"apply_image_torch expects a B x C x H x W tensor, got shape {tuple(image.shape)}")
        size = resized_shape(image.shape[-2], image.shape[-1], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    # -------------------------------------------------------------------------------- coordinates
    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """``... x 2`` XY in original pixels -> the model frame (float32, same shape)."""
        return coords_to_model(coords, _hw(original_size), self.target_length)

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """XYXY boxes in original pixels -> ``B x 4`` in the model frame (float32)."""
        return boxes_to_model(np.asarray(boxes), _hw(original_size), self.target_length).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        """Torch version of :meth:`apply_coords` (keeps the device)."""
        return coords_to_model_torch(coords, _hw(original_size), self.target_length)

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        """Torch version of :meth:`apply_boxes`: ``B x 4`` model-frame boxes on the input's device."""
        return boxes_to_model_torch(boxes, _hw(original_size), self.target_length).reshape(-1, 4)


def _hw(original_size) -> Tuple[int, int]:
    if len(original_size) < 2:
        raise ValueError(f"original_size must be (H, W), got {original_size!r}")
    return int(original_size[0]), int(original_size[1])
