"""Prompted-segmentation evaluation: 1-point, box and multi-click mIoU.

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
from PIL import Image
from scipy import ndimage

from ..geometry import boxes_to_model, coords_to_model, resized_shape
from ..modeling.sam import Sam
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


def _decode(model: Sam, embedding: torch.Tensor, points, boxes, mask_input, multimask: bool,
            input_size, original_size):
    sparse, dense = model.embed_prompts(points, boxes, mask_input)
    low, iou = model.decode(embedding, sparse, dense, multimask)
    masks = model.postprocess_masks(low, input_size, original_size) > model.mask_threshold
    return masks.cpu().numpy(), iou.float().cpu().numpy(), low


@torch.inference_mode()
def evaluate(model: Sam, dataset, cfg: EvalConfig = EvalConfig(), progress: bool = True) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` (items: :class:`~anyseg.train.datasets.Sample`)."""
    if cfg.clicks < 1:
        raise ValueError(f"clicks must be >= 1, got {cfg.clicks}")
    model.eval()
    device = model.device
    dtype = next(model.parameters()).dtype
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
            _eval_image(model, sample.image, sample.masks[keep], cfg, device, dtype, result)
            result.images += 1
        if bar is not None:
            bar.update(1)
            if result.instances:
                bar.set_postfix(point=f"{np.mean(result.point_confident):.3f}", box=f"{np.mean(result.box):.3f}")
    if bar is not None:
        bar.close()
    return result


def _eval_image(model: Sam, image: np.ndarray, gts: np.ndarray, cfg: EvalConfig, device, dtype,
                result: EvalResult) -> None:
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, model.img_size)
    resized = np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    x = torch.as_tensor(resized, device=device).permute(2, 0, 1).to(dtype)[None]
    embedding = model.encode_image(model.preprocess(x))
    sizes = ((new_h, new_w), (h, w))
    for start in range(0, len(gts), cfg.batch_size):
        gt = gts[start:start + cfg.batch_size]
        b = len(gt)
        clicks = [[(*farthest_from_boundary(m), 1)] for m in gt]
        # 1 point, three outputs
        pts = _points(clicks, (h, w), model.img_size, device, dtype)
        masks, iou, low = _decode(model, embedding, pts, None, None, True, *sizes)
        ious = np.stack([_iou(masks[i], gt[i]) for i in range(b)])
        best = iou.argmax(axis=1)
        result.point_oracle += ious.max(axis=1).tolist()
        result.point_confident += ious[np.arange(b), best].tolist()
        # box, one output
        boxes = torch.as_tensor(boxes_to_model(mask_boxes(gt), (h, w), model.img_size), device=device, dtype=dtype)
        bmasks, _, _ = _decode(model, embedding, None, boxes, None, False, *sizes)
        result.box += [float(_iou(bmasks[i, 0], gt[i])) for i in range(b)]
        # clicks
        curve = [ious[np.arange(b), best]]
        pred = masks[np.arange(b), best]
        prev = low[torch.arange(b, device=low.device), torch.as_tensor(best, device=low.device)][:, None]
        active = np.ones(b, bool)
        for _ in range(cfg.clicks - 1):
            for i in range(b):
                click = next_click(pred[i], gt[i]) if active[i] else None
                if click is None:
                    active[i] = False
                    clicks[i].append((0, 0, -1))  # padding: keeps the batch rectangular, result unused
                else:
                    clicks[i].append(click)
            pts = _points(clicks, (h, w), model.img_size, device, dtype)
            new_masks, _, new_low = _decode(model, embedding, pts, None, prev if cfg.feed_logits else None, False,
                                            *sizes)
            step = curve[-1].copy()
            for i in np.flatnonzero(active):
                step[i] = _iou(new_masks[i, 0], gt[i])
                pred[i] = new_masks[i, 0]
            keep = torch.as_tensor(active, device=prev.device)[:, None, None, None]
            prev = torch.where(keep, new_low, prev)
            curve.append(step)
        result.curve += np.stack(curve, axis=1).tolist()


def _points(clicks, original_size, img_size, device, dtype):
    coords = np.array([[c[:2] for c in cs] for cs in clicks], dtype=np.float64)
    labels = np.array([[c[2] for c in cs] for cs in clicks], dtype=np.int64)
    coords = coords_to_model(coords, original_size, img_size)
    return (torch.as_tensor(coords, device=device, dtype=dtype), torch.as_tensor(labels, device=device))
