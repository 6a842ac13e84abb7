"""Pictures of masks for people: colour overlays, prompt markers and label-map colouring.

Torch-free: inputs are numpy arrays in original-image pixels (``H x W x 3`` uint8 images,
``N x H x W`` boolean masks, ``N x 2`` XY points, ``N x 4`` XYXY boxes).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

# A fixed, well-separated palette for the first masks; later ones come from a golden-ratio hue walk,
# so colours are stable between runs and neighbouring ids differ.
_PALETTE = np.array(
    [
        [30, 144, 255], [255, 99, 71], [50, 205, 50], [255, 215, 0], [186, 85, 211],
        [0, 206, 209], [255, 140, 0], [199, 21, 133], [127, 255, 0], [70, 130, 180],
    ],
    dtype=np.uint8,
)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.round(np.array(rgb) * 255).astype(np.uint8)


def palette(n: int) -> np.ndarray:
    """``n x 3`` uint8 distinct colours; the same ``n`` always gives the same colours."""
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    colours = [_PALETTE[i] if i < len(_PALETTE) else _hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
               for i in range(n)]
    return np.stack(colours).astype(np.uint8) if colours else np.zeros((0, 3), np.uint8)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got shape {image.shape} and dtype {image.dtype}")
    return image


def _check_masks(masks, shape) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != tuple(shape):
        raise ValueError(f"expected N x {shape[0]} x {shape[1]} masks (the image's size), got shape {masks.shape}")
    return masks.astype(bool, copy=False)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_masks(
    image: np.ndarray,
    masks,
    *,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    boxes: Optional[np.ndarray] = None,
    alpha: float = 0.5,
    colors: Optional[np.ndarray] = None,
    outline: bool = True,
) -> np.ndarray:
    """Blend ``N x H x W`` masks onto an ``H x W x 3`` uint8 image, each in its own colour.

    Masks are painted largest first so small objects on top of large ones stay visible; each gets a
    solid outline. Points (``K x 2`` XY, original pixels) are drawn as green (label 1) or red
    (label 0) dots with a white ring; boxes (``M x 4`` XYXY) as rectangles. Returns a new image.
    """
    image = _check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    masks = _check_masks(masks, image.shape[:2])
    colors = palette(len(masks)) if colors is None else np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if len(colors) < len(masks):
        raise ValueError(f"need one colour per mask: got {len(colors)} colours for {len(masks)} masks")
    out = image.astype(np.float32)
    areas = masks.sum(axis=(1, 2))
    for i in np.argsort(-areas, kind="stable"):
        if areas[i] == 0:
            continue
        # Work inside the mask's bounding box: many masks are small next to the image.
        rows, cols = np.flatnonzero(masks[i].any(axis=1)), np.flatnonzero(masks[i].any(axis=0))
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        mask, region = masks[i][box], out[box]
        region[mask] = (1 - alpha) * region[mask] + alpha * colors[i]
        if outline:
            region[_outline(mask)] = colors[i]
    result = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    line = max(2, round(max(image.shape[:2]) / 400))
    if boxes is not None:
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 0), width=line)
    if points is not None:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labels = np.ones(len(pts), int) if point_labels is None else np.asarray(point_labels).reshape(-1)
        if len(labels) != len(pts):
            raise ValueError(f"got {len(pts)} points but {len(labels)} labels")
        r = 3 * line
        for (x, y), label in zip(pts, labels):
            fill = (0, 200, 0) if label == 1 else (220, 0, 0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255), width=max(1, line // 2))
    return np.asarray(result)


def colorize_labels(label_map: np.ndarray) -> np.ndarray:
    """``H x W`` integer instance ids (0 = background) -> ``H x W x 3`` uint8 colours (background black)."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"expected an H x W integer label map, got shape {label_map.shape} and dtype {label_map.dtype}")
    if label_map.size and label_map.min() < 0:
        raise ValueError("label ids must be >= 0 (0 is background)")
    n = int(label_map.max()) if label_map.size else 0
    table = np.concatenate([np.zeros((1, 3), np.uint8), palette(n)])
    return table[label_map]


def side_by_side(images: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Place ``H x W x 3`` uint8 images left to right on white, top-aligned."""
    if not images:
        raise ValueError("need at least one image")
    images = [_check_image(im) for im in images]
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for im in images:
        canvas[: im.shape[0], x : x + im.shape[1]] = im
        x += im.shape[1] + gap
    return canvas
