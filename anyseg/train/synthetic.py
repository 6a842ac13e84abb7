"""A procedural, seeded dataset of textured objects with parts that occlude each other.

Every scene is drawn from its masks (no anti-aliasing), so the masks are exact: each object's visible
region and each part's visible region. Scene ``i`` of a dataset with seed ``s`` depends only on
``(s, i)``, so a dataset can be regenerated anywhere, in any order, and held-out sets are simply other
seeds. Used for tests and for pre-training small models.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .datasets import Sample

_SHAPES = ("ellipse", "rectangle", "polygon", "ring")
_PATTERNS = ("flat", "stripes", "checker", "dots", "noise")


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                angle: float, rng: np.random.Generator) -> np.ndarray:
    """An ``H x W`` bool mask of one shape centred at (cx, cy) with radii (rx, ry), rotated by ``angle``."""
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * cos + (yy - cy) * sin) / rx
    v = (-(xx - cx) * sin + (yy - cy) * cos) / ry
    if kind == "ellipse":
        return u * u + v * v <= 1.0
    if kind == "rectangle":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= rng.uniform(0.15, 0.35))
    # A star-ish polygon: radius varies with the angle around the centre.
    n = int(rng.integers(3, 8))
    depth = rng.uniform(0.0, 0.45)
    phase = rng.uniform(0, 2 * np.pi)
    theta = np.arctan2(v, u)
    radius = 1.0 - depth * (0.5 + 0.5 * np.cos(n * theta + phase))
    return np.sqrt(u * u + v * v) <= radius


def _texture(shape: Tuple[int, int], yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An ``H x W x 3`` float texture in [0, 255]: a base colour and a random pattern in a second one."""
    base = rng.uniform(0, 255, size=3)
    other = np.clip(base + rng.choice([-1, 1], size=3) * rng.uniform(40, 110, size=3), 0, 255)
    pattern = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
    if pattern == "flat":
        weight = np.zeros(shape)
    elif pattern == "stripes":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(4, 14)
        weight = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0).astype(float)
    elif pattern == "checker":
        cell = rng.uniform(3, 10)
        weight = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(float)
    elif pattern == "dots":
        cell = rng.uniform(5, 12)
        fy, fx = (yy % cell) - cell / 2, (xx % cell) - cell / 2
        weight = (fy * fy + fx * fx <= (cell * 0.3) ** 2).astype(float)
    else:
        weight = rng.uniform(0, 1, size=shape)
    return base * (1 - weight[..., None]) + other * weight[..., None]


def _background(h: int, w: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / max(h, w)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    return img + rng.normal(0, 6, size=(h, w, 3))


class SyntheticDataset:
    """Seeded scenes of textured, overlapping objects with parts.

    Args:
        count: number of scenes.
        seed: scenes of different seeds are different (use another seed for a held-out set).
        size: long side of each image in pixels; the short side is drawn from [0.7, 1] x size.
        objects: (min, max) number of objects per scene.
        parts: include part masks (a distinctly textured region inside each object).
        min_area: drop visible masks smaller than this many pixels.

    Each item is a :class:`~anyseg.train.datasets.Sample` whose ``masks`` are ``N x H x W`` bool,
    objects first (each its visible region, parts included), then parts; ``kinds`` says which.
    """

    def __init__(self, count: int = 200, seed: int = 0, size: int = 128, objects: Tuple[int, int] = (2, 5),
                 parts: bool = True, min_area: int = 30) -> None:
        if count <= 0:
            raise ValueError(f"synthetic dataset: count must be positive, got {count}")
        if size < 32:
            raise ValueError(f"synthetic dataset: size must be at least 32 pixels, got {size}")
        if not (1 <= objects[0] <= objects[1]):
            raise ValueError(f"synthetic dataset: objects must be (min, max) with 1 <= min <= max, got {objects}")
        self.count, self.seed, self.size = int(count), int(seed), int(size)
        self.objects, self.parts, self.min_area = (int(objects[0]), int(objects[1])), bool(parts), int(min_area)

    @property
    def key(self) -> str:
        """Identifies the data (used to name embedding caches)."""
        return (f"synthetic-n{self.count}-s{self.seed}-px{self.size}-o{self.objects[0]}_{self.objects[1]}"
                f"-p{int(self.parts)}-a{self.min_area}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.count:
            raise IndexError(f"synthetic scene {index} out of range [0, {self.count})")
        return self.render(index)

    def render(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, index, 7919])
        long_side = self.size
        short = int(round(long_side * rng.uniform(0.7, 1.0)))
        h, w = (short, long_side) if rng.uniform() < 0.6 else (long_side, short)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        image = _background(h, w, yy, xx, rng)

        n_obj = int(rng.integers(self.objects[0], self.objects[1] + 1))
        shapes: List[np.ndarray] = []
        part_shapes: List[List[np.ndarray]] = []
        for _ in range(n_obj):
            kind = _SHAPES[int(rng.integers(len(_SHAPES)))]
            ry, rx = rng.uniform(0.12, 0.3, size=2) * min(h, w)
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            angle = rng.uniform(0, np.pi)
            obj = _shape_mask(kind, yy, xx, cy, cx, ry, rx, angle, rng)
            if not obj.any():
                continue
            # Painter's order: later objects cover earlier ones.
            texture = _texture((h, w), yy, xx, rng)
            image[obj] = texture[obj]
            parts: List[np.ndarray] = []
            if self.parts:
                for _ in range(int(rng.integers(1, 3))):
                    ys, xs = np.nonzero(obj)
                    k = int(rng.integers(len(ys)))
                    pr = rng.uniform(0.25, 0.5) * np.array([ry, rx])
                    part_kind = _SHAPES[int(rng.integers(2))]
                    part = _shape_mask(part_kind, yy, xx, ys[k], xs[k], pr[0], pr[1], rng.uniform(0, np.pi), rng)
                    part &= obj
                    if part.sum() < self.min_area:
                        continue
                    image[part] = _texture((h, w), yy, xx, rng)[part]
                    parts.append(part)
            shapes.append(obj)
            part_shapes.append(parts)

        masks, kinds, parents = [], [], []
        covered = np.zeros((h, w), bool)
        visible_objs: List[Tuple[int, np.ndarray]] = []
        for i in range(len(shapes) - 1, -1, -1):
            visible = shapes[i] & ~covered
            covered |= shapes[i]
            visible_objs.append((i, visible))
        visible_objs.reverse()
        obj_ids = {}
        for i, visible in visible_objs:
            if visible.sum() >= self.min_area:
                obj_ids[i] = len(masks)
                masks.append(visible)
                kinds.append("object")
                parents.append(-1)
        for i, visible in visible_objs:
            if i not in obj_ids:
                continue
            for part in part_shapes[i]:
                vis_part = part & visible
                if vis_part.sum() >= self.min_area and not np.array_equal(vis_part, visible):
                    masks.append(vis_part)
                    kinds.append("part")
                    parents.append(obj_ids[i])
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        stack = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        return Sample(image=image, masks=stack, image_id=f"synthetic-{self.seed}-{index}", kinds=kinds,
                      parents=parents)
