"""What differs between the model families at run time: the encoder's input, the model frame and the
prompt layout of the decoder graph. Each family is one small class; :class:`~.predictor.OnnxPredictor`
talks only to the one its graphs name (:data:`FAMILIES`). Torch-free: numpy and Pillow.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

from ..geometry import boxes_to_model, coords_to_model, resized_shape
from .graphs import FAMILY_HQ, FAMILY_SAM, FAMILY_SAM2, HIGH_RES_NAMES, INTERM_NAME, GraphSession
from .resize import resize_bilinear_aa

_F = np.float32


class SamFamily:
    """SAM 1: the long side resized to ``img_size`` with PIL (bilinear), padding and normalisation inside
    the encoder graph; prompts scaled by ``new / old`` per axis; points first, then the box corners or
    one padding point."""

    name = FAMILY_SAM
    #: the encoder outputs the decoder takes, besides ``image_embeddings``.
    extra_features: Tuple[str, ...] = ()

    def __init__(self, img_size: int, encoder: Optional[GraphSession] = None) -> None:
        self.img_size = img_size

    def input_size(self, original_size: Tuple[int, int]) -> Tuple[int, int]:
        """The image's extent ``(h, w)`` in the model frame."""
        return resized_shape(original_size[0], original_size[1], self.img_size)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 RGB -> ``h x w x 3`` uint8, the long side ``img_size`` (as SamPredictor)."""
        new_h, new_w = self.input_size(image.shape[:2])
        return np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))

    def encoder_input(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 RGB -> the encoder's ``1 x 3 x h x w`` float32 input (values 0..255)."""
        return np.ascontiguousarray(self.resize(image).transpose(2, 0, 1)[None], dtype=_F)

    def prompt_inputs(self, coords: Optional[np.ndarray], labels: Optional[np.ndarray], boxes: Optional[np.ndarray],
                      original_size: Tuple[int, int], normalize_coords: bool = True):
        """Checked original-frame prompts -> the decoder's ``N x 2`` model-frame coords and ``N`` labels."""
        if not normalize_coords:
            raise ValueError("normalize_coords=False (coordinates in [0, 1]) is SAM 2's option; SAM 1 graphs "
                             "take prompts in pixels of the original image")
        parts, part_labels = [], []
        if coords is not None:
            parts.append(coords_to_model(coords, original_size, self.img_size))
            part_labels.append(labels.astype(_F))
        if boxes is not None:
            parts.append(boxes_to_model(boxes, original_size, self.img_size).reshape(2, 2))
            part_labels.append(np.array([2.0, 3.0], dtype=_F))
        elif coords is not None:
            parts.append(np.zeros((1, 2), dtype=_F))
            part_labels.append(np.array([-1.0], dtype=_F))
        return parts, part_labels


class Sam2Family(SamFamily):
    """SAM 2 (spec/sam2.md sections 1 and 5): the image squashed to ``img_size x img_size`` (no padding) by
    an antialiased bilinear resize of the float image in [0, 1], normalised here (the encoder graph takes
    the model input); prompts scaled by ``img_size / W`` and ``img_size / H`` in float32; the box corners
    first, then the clicks, then always one padding point."""

    name = FAMILY_SAM2
    extra_features = HIGH_RES_NAMES

    def __init__(self, img_size: int, encoder: Optional[GraphSession] = None) -> None:
        super().__init__(img_size)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        if encoder is not None:
            mean = encoder.meta_floats("anyseg.pixel_mean", mean)
            std = encoder.meta_floats("anyseg.pixel_std", std)
        # float32 like the model's buffers (the metadata holds the float64 values of its config).
        self.mean = np.asarray(mean, dtype=_F).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=_F).reshape(3, 1, 1)

    def input_size(self, original_size: Tuple[int, int]) -> Tuple[int, int]:
        return self.img_size, self.img_size

    def _resize_chw(self, image: np.ndarray) -> np.ndarray:
        x = image.transpose(2, 0, 1).astype(_F) / _F(255.0)
        return resize_bilinear_aa(x, (self.img_size, self.img_size))

    def resize(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 RGB -> ``S x S x 3`` float32 in [0, 1] (antialiased bilinear, as SAM 2)."""
        return np.ascontiguousarray(self._resize_chw(image).transpose(1, 2, 0))

    def encoder_input(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 RGB -> the normalised ``1 x 3 x S x S`` model input, as
        :func:`anyseg.sam2_predictor.sam2_image_to_tensor` computes it (same float32 steps)."""
        return np.ascontiguousarray(((self._resize_chw(image) - self.mean) / self.std)[None], dtype=_F)

    def to_model(self, xy: np.ndarray, original_size: Tuple[int, int], normalize_coords: bool) -> np.ndarray:
        """``... x 2`` XY in original pixels (or in [0, 1] without ``normalize_coords``) -> model frame."""
        xy = np.array(xy, dtype=_F)
        if normalize_coords:
            h, w = original_size
            xy[..., 0] = xy[..., 0] / _F(w)
            xy[..., 1] = xy[..., 1] / _F(h)
        return (xy * _F(self.img_size)).astype(_F)

    def prompt_inputs(self, coords, labels, boxes, original_size, normalize_coords=True):
        parts, part_labels = [], []
        if boxes is not None:
            parts.append(self.to_model(boxes.reshape(2, 2), original_size, normalize_coords))
            part_labels.append(np.array([2.0, 3.0], dtype=_F))
        if coords is not None:
            parts.append(self.to_model(coords, original_size, normalize_coords))
            part_labels.append(labels.astype(_F))
        if parts:
            parts.append(np.zeros((1, 2), dtype=_F))
            part_labels.append(np.array([-1.0], dtype=_F))
        return parts, part_labels


class SamHQFamily(SamFamily):
    """HQ-SAM: SAM 1's preprocessing, model frame and prompt layout; the encoder graph also gives the early
    feature ``interm_embeddings`` (``1 x 64 x 64 x D``), which the decoder graph takes with ``hq_token_only``."""

    name = FAMILY_HQ
    extra_features = (INTERM_NAME,)


FAMILIES: Dict[str, type] = {FAMILY_SAM: SamFamily, FAMILY_SAM2: Sam2Family, FAMILY_HQ: SamHQFamily}
