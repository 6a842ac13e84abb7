"""Generated inputs for the pipelines of :mod:`anyseg.beyond`: seeded scenes with known truth, used by the
tests, the documentation's pictures and ``scripts/make-beyond-demo.py``."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

__all__ = ["background", "persam_scenes", "removal_scene", "volume_phantom"]


def background(height: int, width: int, rng: np.random.Generator, noise: float = 4.0) -> np.ndarray:
    """A smooth two-colour gradient with a little noise, ``H x W x 3`` float in [0, 255]."""
    a, b = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255)


def _disk(height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _stripes(height: int, width: int, period: float, colours) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    band = (((xx + yy) / period).astype(int) % 2).astype(bool)
    return np.where(band[..., None], np.asarray(colours[0], float), np.asarray(colours[1], float))


def persam_scenes(n_targets: int = 4, seed: int = 0, size: int = 128) -> Tuple[Tuple[np.ndarray, np.ndarray],
                                                                             List[Tuple[np.ndarray, np.ndarray]]]:
    """One striped disk (the "personal" object) in a reference scene and again, at other places and scales,
    in ``n_targets`` target scenes, each with a plain distractor near the image centre.

    Returns ``((ref_image, ref_mask), [(target_image, target_mask), ...])``: uint8 RGB images, bool masks."""
    rng = np.random.default_rng(seed)
    colours = ((230, 40, 40), (250, 230, 60))

    def scene(cx, cy, r, distractor: bool):
        img = background(size, size, rng)
        if distractor:  # a plain square of another colour over the centre, where a blind click lands
            c = size // 2
            half = int(size * rng.uniform(0.10, 0.14))
            img[c - half:c + half, c - half:c + half] = rng.uniform(20, 90, 3)
        mask = _disk(size, size, cx, cy, r)
        img[mask] = _stripes(size, size, max(3.0, r / 3), colours)[mask]
        return img.round().astype(np.uint8), mask

    ref = scene(size * 0.5, size * 0.5, size * 0.2, distractor=False)
    targets = []
    for _ in range(n_targets):
        r = size * rng.uniform(0.12, 0.2)
        # a corner region, clear of the central distractor
        qx, qy = rng.integers(0, 2, 2)
        cx = (r + 2 + rng.uniform(0, size * 0.08)) if qx == 0 else (size - r - 2 - rng.uniform(0, size * 0.08))
        cy = (r + 2 + rng.uniform(0, size * 0.08)) if qy == 0 else (size - r - 2 - rng.uniform(0, size * 0.08))
        targets.append(scene(cx, cy, r, distractor=True))
    return ref, targets


def removal_scene(seed: int = 0, height: int = 120, width: int = 160) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A plain disk on a smooth background: ``(image, object_mask, background_without_object)``, uint8 / bool."""
    rng = np.random.default_rng(seed)
    bg = background(height, width, rng, noise=2.0)
    r = min(height, width) * rng.uniform(0.15, 0.2)
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
    mask = _disk(height, width, cx, cy, r)
    img = bg.copy()
    img[mask] = rng.uniform(0, 50, 3) if bg.mean() > 128 else rng.uniform(200, 255, 3)
    return img.round().astype(np.uint8), mask, bg.round().astype(np.uint8)


def volume_phantom(shape: Tuple[int, int, int] = (96, 80, 24), seed: int = 0, spacing=(0.8, 0.8, 2.5)
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CT-like volume ``X x Y x Z`` (Hounsfield-like units): a bright ellipsoid (about 60 HU above soft
    tissue) inside a darker body, in noise. Returns ``(volume float32, truth bool, affine 4 x 4)``; the
    ellipsoid spans the middle slices only, so it starts and ends inside the volume."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    body = ((x - nx / 2) / (nx * 0.45)) ** 2 + ((y - ny / 2) / (ny * 0.45)) ** 2 <= 1
    cx, cy, cz = nx * rng.uniform(0.4, 0.6), ny * rng.uniform(0.4, 0.6), nz / 2
    ax, ay, az = nx * 0.18, ny * 0.16, nz * 0.3
    truth = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1
    vol = np.full(shape, -1000.0)
    vol[body] = 40.0
    vol[truth] = 220.0
    vol += rng.normal(0, 15, shape)
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (-nx * spacing[0] / 2, -ny * spacing[1] / 2, -nz * spacing[2] / 2)
    return vol.astype(np.float32), truth, affine
