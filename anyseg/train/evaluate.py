"""Prompted-segmentation evaluation: 1-point, box and multi-click mIoU, for any model family (the
model is used through :mod:`anyseg.protocol`).

Protocol (IoU measured in the original image frame, masks = logits > 0):

- **1 point**: a foreground click at the mask pixel farthest from the mask boundary (Euclidean
  distance transform; the image border counts as boundary). Three outputs: *oracle* = the best of
  the three, *confident* = the one with the highest predicted IoU.
- **box**: the mask's tight box, single output.
- **clicks 1..N**: click 1 as above (confident output); every next click goes to the pixel farthest
  from the boundary of the largest error region (false negatives -> foreground click, false
  positives -> background click); all clicks so far are given, plus the previous low-res logits as
  mask prompt (``feed_logits``), single output. An instance predicted perfectly keeps its IoU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from scipy import ndimage

from ..protocol import ImagePredictor, make_predictor
from .datasets import mask_boxes, select_masks


@dataclass
class EvalConfig:
    clicks: int = 5
    max_images: Optional[int] = None
    max_instances: Optional[int] = None
    feed_logits: bool = True
    batch_size: int = 16
    seed: int = 0


def farthest_from_boundary(mask: np.ndarray) -> Tuple[int, int]:
    """``(x, y)`` of the pixel of an ``H x W`` bool mask farthest from its boundary (first in raster
    order on ties). Pixels outside the image count as background."""
    if not mask.any():
        raise ValueError("cannot place a click in an empty mask")
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def next_click(pred: np.ndarray, gt: np.ndarray) -> Optional[Tuple[int, int, int]]:
    """The corrective click for ``H x W`` bool prediction vs ground truth: ``(x, y, label)`` at the
    centre of the largest connected error region (label 1 on missed object, 0 on a false positive),
    or None when the prediction is exact."""
    best = None
    for label, region in ((1, gt & ~pred), (0, pred & ~gt)):
        if not region.any():
            continue
        comps, n = ndimage.label(region)
        sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), label, comps == k + 1)
    if best is None:
        return None
    x, y = farthest_from_boundary(best[2])
    return x, y, best[1]


def _iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``... x H x W`` bool vs ``H x W`` -> IoU per mask (1 when both are empty)."""
    inter = (pred & gt).sum(axis=(-2, -1))
    union = (pred | gt).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@dataclass
class EvalResult:
    """Per-instance IoUs: ``point_oracle``, ``point_confident``, ``box`` (``N``) and ``curve``
    (``N x clicks``, the IoU after each click)."""

    point_oracle: List[float] = field(default_factory=list)
    point_confident: List[float] = field(default_factory=list)
    box: List[float] = field(default_factory=list)
    curve: List[List[float]] = field(default_factory=list)
    images: int = 0

    @property
    def instances(self) -> int:
        return len(self.box)

    def summary(self) -> Dict[str, object]:
        def mean(values) -> float:
            return float(np.mean(values)) if len(values) else float("nan")

        curve = np.asarray(self.curve, dtype=np.float64).reshape(len(self.curve), -1)
        return {
            "images": self.images,
            "instances": self.instances,
            "point_oracle_miou": mean(self.point_oracle),
            "point_confident_miou": mean(self.point_confident),
            "box_miou": mean(self.box),
            "clicks_miou": [float(v) for v in curve.mean(axis=0)] if len(curve) else [],
        }

    def table(self, title: str = "") -> str:
        s = self.summary()
        lines = [title] if title else []
        lines += [f"{'metric':<28}{'mIoU':>8}", "-" * 36,
                  f"{'1 point (oracle, best of 3)':<28}{s['point_oracle_miou']:>8.4f}",
                  f"{'1 point (confident)':<28}{s['point_confident_miou']:>8.4f}",
                  f"{'box':<28}{s['box_miou']:>8.4f}"]
        for k, v in enumerate(s["clicks_miou"], 1):
            lines.append(f"{f'{k} click' + ('s' if k > 1 else ''):<28}{v:>8.4f}")
        lines.append(f"({s['instances']} instances in {s['images']} images)")
        return "\n".join(lines)


@torch.inference_mode()
def evaluate(model, dataset, cfg: EvalConfig = EvalConfig(), progress: bool = True) -> EvalResult:
    """Evaluate ``model`` (SAM 1 or SAM 2, through :func:`anyseg.protocol.make_predictor`) on ``dataset``
    (items: :class:`~anyseg.train.datasets.Sample`)."""
    if cfg.clicks < 1:
        raise ValueError(f"clicks must be >= 1, got {cfg.clicks}")
    model.eval()
    predictor = make_predictor(model)
    result = EvalResult()
    n_images = len(dataset) if cfg.max_images is None else min(len(dataset), cfg.max_images)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_images, desc="eval", unit="img", dynamic_ncols=True)
    rng = np.random.default_rng(cfg.seed)
    for index in range(n_images):
        sample = dataset[index]
        keep = select_masks(sample.masks, cfg.max_instances, rng)
        if len(keep):
            _eval_image(predictor, sample.image, sample.masks[keep], cfg, result)
            result.images += 1
        if bar is not None:
            bar.update(1)
            if result.instances:
                bar.set_postfix(point=f"{np.mean(result.point_confident):.3f}", box=f"{np.mean(result.box):.3f}")
    if bar is not None:
        bar.close()
    predictor.reset()
    return result


def _eval_image(predictor: ImagePredictor, image: np.ndarray, gts: np.ndarray, cfg: EvalConfig,
                result: EvalResult) -> None:
    predictor.set_image(image)
    for start in range(0, len(gts), cfg.batch_size):
        gt = gts[start:start + cfg.batch_size]
        b = len(gt)
        rows = np.arange(b)
        clicks = [[(*farthest_from_boundary(m), 1)] for m in gt]
        # 1 point, three outputs
        masks, iou, low = predictor.decode_batch(*_points(clicks), multimask_output=True)
        ious = np.stack([_iou(masks[i], gt[i]) for i in range(b)])
        best = iou.argmax(axis=1)
        result.point_oracle += ious.max(axis=1).tolist()
        result.point_confident += ious[rows, best].tolist()
        # box, one output
        bmasks = predictor.decode_batch(boxes=mask_boxes(gt), multimask_output=False).masks
        result.box += [float(_iou(bmasks[i, 0], gt[i])) for i in range(b)]
        # clicks
        curve = [ious[rows, best]]
        pred = masks[rows, best]
        prev = low[rows, best][:, None]
        active = np.ones(b, bool)
        for _ in range(cfg.clicks - 1):
            for i in range(b):
                click = next_click(pred[i], gt[i]) if active[i] else None
                if click is None:
                    active[i] = False
                    clicks[i].append((0, 0, -1))  # padding: keeps the batch rectangular, result unused
                else:
                    clicks[i].append(click)
            new_masks, _, new_low = predictor.decode_batch(*_points(clicks), multimask_output=False,
                                                           mask_input=prev if cfg.feed_logits else None)
            step = curve[-1].copy()
            for i in np.flatnonzero(active):
                step[i] = _iou(new_masks[i, 0], gt[i])
                pred[i] = new_masks[i, 0]
            prev = np.where(active[:, None, None, None], new_low, prev)
            curve.append(step)
        result.curve += np.stack(curve, axis=1).tolist()


def _points(clicks) -> Tuple[np.ndarray, np.ndarray]:
    """Per-object click lists (all of one length) -> ``B x N x 2`` XY and ``B x N`` labels."""
    coords = np.array([[c[:2] for c in cs] for cs in clicks], dtype=np.float64)
    labels = np.array([[c[2] for c in cs] for cs in clicks], dtype=np.int64)
    return coords, labels
