"""Object removal (Inpaint Anything): click an object, SAM masks it, the mask is dilated and the hole filled.

The default fillers need no weights: OpenCV's Telea (``"telea"``) or Navier-Stokes (``"ns"``) inpainting
(the ``inpaint`` extra, ``opencv-python-headless``) and scikit-image's biharmonic inpainting
(``"biharmonic"``). A generative model fills a crop around the mask instead, as Inpaint Anything does:
:class:`CropFiller` wraps any ``fill(crop_rgb, crop_mask) -> crop_rgb`` at a fixed working size, and
:func:`diffusers_filler` builds one from a local Stable Diffusion inpainting directory (``diffusers``, the
``inpaint-diffusion`` extra)::

    from anyseg import load_model, make_predictor
    from anyseg.beyond.remove import remove_object

    result = remove_object(make_predictor(load_model("vit_b")), "photo.jpg", point=(420, 310), dilate=15)
    result.image   # the photo without the object
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

from . import require

__all__ = ["CropFiller", "FILLERS", "RemovalResult", "diffusers_filler", "dilate_mask", "fill", "remove_object"]

FILLERS = ("telea", "ns", "biharmonic")


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` in every direction (a disk-shaped structuring element)."""
    mask = np.asarray(mask).astype(bool)
    if pixels < 0:
        raise ValueError(f"dilate must be a non-negative number of pixels, got {pixels}")
    if pixels == 0 or not mask.any():
        return mask
    from scipy import ndimage

    # Distance to the mask <= pixels: a disk dilation at any size in one pass.
    return ndimage.distance_transform_edt(~mask) <= pixels


def fill(image: np.ndarray, mask: np.ndarray, filler: Union[str, Callable] = "telea", radius: int = 5) -> np.ndarray:
    """``image`` (``H x W x 3`` uint8 RGB) with the pixels of ``mask`` filled in from their surroundings."""
    image = np.asarray(image)
    mask = np.asarray(mask).astype(bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"the mask is {mask.shape} but the image is {image.shape[:2]}")
    if not mask.any():
        return image.copy()
    if callable(filler):
        out = np.asarray(filler(image, mask))
        if out.shape != image.shape:
            raise ValueError(f"the filler returned shape {out.shape}, expected {image.shape}")
        result = image.copy()
        result[mask] = out.astype(np.uint8)[mask]
        return result
    if filler in ("telea", "ns"):
        cv2 = require("cv2", "inpaint", f"the {filler!r} filler (OpenCV inpainting)")
        flag = cv2.INPAINT_TELEA if filler == "telea" else cv2.INPAINT_NS
        bgr = np.ascontiguousarray(image[..., ::-1])
        out = cv2.inpaint(bgr, mask.astype(np.uint8) * 255, float(radius), flag)
        return np.ascontiguousarray(out[..., ::-1])
    if filler == "biharmonic":
        restoration = require("skimage.restoration", "inpaint", "the 'biharmonic' filler (scikit-image)")
        out = restoration.inpaint_biharmonic(image.astype(np.float64) / 255.0, mask, channel_axis=-1)
        return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown filler {filler!r}: use one of {', '.join(FILLERS)} or a callable")


class CropFiller:
    """Fill with a model that works at a fixed size, on a square crop around the mask (Inpaint Anything's way).

    The crop is the mask's bounding square grown by ``margin`` (a fraction of its side, at least
    ``min_side`` px), clipped to the image; it is resized to ``size x size``, filled by
    ``fill(crop_rgb uint8, crop_mask bool) -> crop_rgb``, resized back, and only the masked pixels are
    pasted into the image."""

    def __init__(self, fill_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], size: int = 512,
                 margin: float = 0.5, min_side: int = 64) -> None:
        if size < 8:
            raise ValueError(f"size must be at least 8 px, got {size}")
        self.fill_fn, self.size, self.margin, self.min_side = fill_fn, int(size), float(margin), int(min_side)

    def crop_box(self, mask: np.ndarray) -> tuple:
        """``(x0, y0, x1, y1)`` of the crop around ``mask`` (exclusive ends)."""
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) * (1 + self.margin)
        side = int(min(max(side, self.min_side), max(h, w)))
        x0 = int(np.clip(round(cx - side / 2), 0, max(w - side, 0)))
        y0 = int(np.clip(round(cy - side / 2), 0, max(h - side, 0)))
        return x0, y0, min(x0 + side, w), min(y0 + side, h)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from PIL import Image

        x0, y0, x1, y1 = self.crop_box(mask)
        crop, crop_mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        big = np.asarray(Image.fromarray(crop).resize((self.size, self.size), Image.BICUBIC))
        big_mask = np.asarray(Image.fromarray(crop_mask.astype(np.uint8) * 255).resize((self.size, self.size),
                                                                                      Image.NEAREST)) > 127
        filled = np.asarray(self.fill_fn(big, big_mask))
        if filled.shape != big.shape:
            raise ValueError(f"the crop filler returned shape {filled.shape}, expected {big.shape}")
        back = np.asarray(Image.fromarray(filled.astype(np.uint8)).resize((x1 - x0, y1 - y0), Image.BICUBIC))
        out = image.copy()
        region = out[y0:y1, x0:x1]
        region[crop_mask] = back[crop_mask]
        return out


def diffusers_filler(model_dir: str, prompt: str = "", *, steps: int = 30, size: int = 512, device=None,
                     seed: int = 0) -> CropFiller:
    """A :class:`CropFiller` running a Stable Diffusion inpainting pipeline from a local directory
    (``diffusers``' ``AutoPipelineForInpainting``; the ``inpaint-diffusion`` extra)."""
    diffusers = require("diffusers", "inpaint-diffusion", "diffusion inpainting")
    import torch
    from PIL import Image

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = diffusers.AutoPipelineForInpainting.from_pretrained(model_dir).to(device)

    def run(crop: np.ndarray, crop_mask: np.ndarray) -> np.ndarray:
        generator = torch.Generator(device=device).manual_seed(seed)
        out = pipe(prompt=prompt, image=Image.fromarray(crop), mask_image=Image.fromarray(crop_mask.astype(np.uint8) * 255),
                   height=size, width=size, num_inference_steps=steps, generator=generator).images[0]
        return np.asarray(out.convert("RGB").resize((size, size)))

    return CropFiller(run, size=size)


@dataclass
class RemovalResult:
    """``image`` without the object (``H x W x 3`` uint8), the object's ``mask`` as SAM found it, the
    ``filled`` region (the mask dilated) and SAM's ``score`` for the mask."""

    image: np.ndarray
    mask: np.ndarray
    filled: np.ndarray
    score: float


def remove_object(predictor, image, *, point: Optional[Sequence[float]] = None,
                  points: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                  box: Optional[Sequence[float]] = None, mask: Optional[np.ndarray] = None, dilate: int = 15,
                  filler: Union[str, Callable] = "telea", radius: int = 5, **decode_options) -> RemovalResult:
    """Remove one object from ``image``: SAM masks it from a click (``point`` X, Y), clicks (``points`` with
    ``point_labels``) and/or a ``box``, or ``mask`` is given directly; the mask is dilated by ``dilate``
    pixels (to cover the object's soft edge and shadow) and filled by ``filler``."""
    from ..imageio import load_image

    image = load_image(image)
    score = 1.0
    if mask is None:
        if point is not None:
            if points is not None:
                raise ValueError("give point or points, not both")
            points, point_labels = np.asarray([point], dtype=np.float64).reshape(1, 2), np.array([1])
        if points is None and box is None:
            raise ValueError("say which object to remove: a point X,Y, points with labels, a box or a mask")
        single_click = box is None and points is not None and len(points) == 1
        predictor.set_image(image)
        decoded = predictor.decode(points, point_labels, None if box is None else np.asarray(box, np.float64),
                                   multimask_output=single_click, **decode_options)
        best = int(np.argmax(decoded.scores))
        mask, score = np.asarray(decoded.masks[best]).astype(bool), float(decoded.scores[best])
    else:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"the mask is {mask.shape} but the image is {image.shape[:2]}")
    grown = dilate_mask(mask, dilate)
    return RemovalResult(fill(image, grown, filler, radius), mask, grown, score)
