"""Interactive prompt simulation (SAM's training recipe), batched in torch.

Frames: ground-truth masks, predictions and error regions live on an ``R x R`` *work grid* that
covers the padded ``S x S`` model input (R = S, or R = 4g, the low-res mask size). Prompt coordinates
are always XY in the model frame (pixels of the ``S x S`` input); a work-grid cell ``(row, col)``
maps to the model-frame point at its centre, ``x = (col + 0.5) * S / R - 0.5`` (``x = col`` when R = S).

One sample gets 11 iterations (:func:`iteration_schedule`): a first prompt (a foreground point or a
jittered box, equal chance), 8 iterations that each add a point from the error region, and 2 that add
none (one at a random place among the 8, one at the end). The previous low-res logits are fed back
as the mask prompt in every iteration after the first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

# Point labels understood by the prompt encoder.
PAD, BACKGROUND, FOREGROUND, BOX_TL, BOX_BR = -1, 0, 1, 2, 3


def iteration_schedule(generator: torch.Generator, point_iters: int = 8, refine_iters: int = 2) -> List[bool]:
    """Whether each iteration after the first adds a point: ``point_iters`` True and ``refine_iters``
    False; one False is at a random place among the point iterations, the others at the end.
    Total iterations including the first prompt = 1 + point_iters + refine_iters."""
    if point_iters < 0 or refine_iters < 0:
        raise ValueError(f"iteration counts must be >= 0, got {point_iters} and {refine_iters}")
    schedule = [True] * point_iters
    if refine_iters:
        at = int(torch.randint(0, point_iters + 1, (1,), generator=generator))
        schedule.insert(at, False)
        schedule += [False] * (refine_iters - 1)
    return schedule


def uniform_cell(region: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One cell drawn uniformly from each ``B x H x W`` bool region.

    Returns ``(rc, found)``: ``B x 2`` (row, col) long and ``B`` bool (False where the region is empty;
    its row/col are then 0)."""
    b = region.shape[0]
    flat = region.reshape(b, -1)
    # The k-th cell of the region (in raster order) for k uniform in [0, count): one random number
    # per region, drawn on the CPU generator (reproducible on any device), then found on the
    # region's device through the running count of its cells.
    running = flat.to(torch.int32).cumsum(dim=1, dtype=torch.int32)
    count = running[:, -1].to(torch.float64)
    u = torch.rand(b, generator=generator, dtype=torch.float64).to(flat.device)
    k = torch.minimum((u * count).floor(), (count - 1).clamp(min=0)).to(torch.int32)
    idx = torch.searchsorted(running, (k + 1)[:, None]).squeeze(1)
    found = count > 0
    idx = torch.where(found, idx, torch.zeros_like(idx))
    w = region.shape[-1]
    return torch.stack([idx // w, idx % w], dim=1), found


def cells_to_model(rc: torch.Tensor, grid: int, img_size: int) -> torch.Tensor:
    """``... x 2`` (row, col) work-grid cells -> ``... x 2`` XY model-frame points (cell centres)."""
    scale = img_size / grid
    xy = rc.flip(-1).to(torch.float32)
    return (xy + 0.5) * scale - 0.5


def mask_boxes_torch(masks: torch.Tensor) -> torch.Tensor:
    """``B x H x W`` bool -> ``B x 4`` (col0, row0, col1, row1) inclusive cell indices (0s if empty)."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    h, w = masks.shape[-2:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    r0 = torch.where(rows, ar_h, h).min(dim=1).values
    r1 = torch.where(rows, ar_h, -1).max(dim=1).values
    c0 = torch.where(cols, ar_w, w).min(dim=1).values
    c1 = torch.where(cols, ar_w, -1).max(dim=1).values
    box = torch.stack([c0, r0, c1, r1], dim=1)
    return torch.where(rows.any(1, keepdim=True), box, torch.zeros_like(box))


def jittered_boxes(gt: torch.Tensor, input_size: torch.Tensor, img_size: int, generator: torch.Generator,
                   noise_frac: float = 0.1, max_noise: float = 20.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The boxes of ``B x R x R`` masks in the model frame, each coordinate moved by Gaussian noise
    with std ``noise_frac`` x the box side along that axis, clamped to ``max_noise`` model-frame
    pixels, then clipped to the image (``input_size``: ``B x 2`` (h, w)) and re-ordered.

    Returns ``(jittered, exact)``, both ``B x 4`` XYXY float in the model frame."""
    grid = gt.shape[-1]
    scale = img_size / grid
    cells = mask_boxes_torch(gt).to(torch.float32)
    exact = torch.stack([cells[:, 0] * scale, cells[:, 1] * scale,
                         (cells[:, 2] + 1) * scale - 1, (cells[:, 3] + 1) * scale - 1], dim=1)
    side_w = (exact[:, 2] - exact[:, 0]).clamp(min=1.0)
    side_h = (exact[:, 3] - exact[:, 1]).clamp(min=1.0)
    std = torch.stack([side_w, side_h, side_w, side_h], dim=1) * noise_frac
    noise = torch.randn(exact.shape, generator=generator).to(exact.device) * std
    noise = noise.clamp(-max_noise, max_noise)
    box = exact + noise
    limit_x = (input_size[:, 1].to(box) - 1).clamp(min=0)
    limit_y = (input_size[:, 0].to(box) - 1).clamp(min=0)
    x = box[:, 0::2].clamp(min=0).minimum(limit_x[:, None])
    y = box[:, 1::2].clamp(min=0).minimum(limit_y[:, None])
    box = torch.stack([x.min(1).values, y.min(1).values, x.max(1).values, y.max(1).values], dim=1)
    return box, exact


def error_regions(pred: torch.Tensor, gt: torch.Tensor, valid: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """False negatives (``gt & ~pred``) and false positives (``pred & ~gt``, inside ``valid``)."""
    fn = gt & ~pred
    fp = pred & ~gt
    if valid is not None:
        fn, fp = fn & valid, fp & valid
    return fn, fp


def error_points(pred: torch.Tensor, gt: torch.Tensor, valid: Optional[torch.Tensor], img_size: int,
                 generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One point per sample drawn uniformly from its error region.

    Args: ``B x R x R`` bool prediction, ground truth and valid (unpadded) area.
    Returns ``(xy, labels, found)``: ``B x 2`` model-frame XY, ``B`` labels (1 on a false negative,
    0 on a false positive), ``B`` bool (False: prediction already perfect, no point)."""
    fn, fp = error_regions(pred, gt, valid)
    rc, found = uniform_cell(fn | fp, generator)
    rows = torch.arange(len(rc), device=rc.device)
    labels = fn[rows, rc[:, 0], rc[:, 1]].long()
    return cells_to_model(rc, gt.shape[-1], img_size), labels, found


@dataclass
class PromptState:
    """The prompts of ``B`` samples as point tokens (boxes are two points labelled 2 and 3).

    coords: ``B x K x 2`` model-frame XY; labels: ``B x K`` long (-1 past ``count``); count: ``B``;
    is_box: ``B`` bool (the first prompt was a box)."""

    coords: torch.Tensor
    labels: torch.Tensor
    count: torch.Tensor
    is_box: torch.Tensor

    @classmethod
    def first(cls, gt: torch.Tensor, input_size: torch.Tensor, img_size: int, generator: torch.Generator,
              capacity: int, box_prob: float = 0.5, noise_frac: float = 0.1, max_noise: float = 20.0
              ) -> "PromptState":
        """Each sample's first prompt: a foreground point uniform in the mask, or (with ``box_prob``)
        its jittered box. ``capacity``: the most tokens a sample will hold."""
        b = gt.shape[0]
        device = gt.device
        is_box = (torch.rand(b, generator=generator) < box_prob).to(device)
        rc, _ = uniform_cell(gt, generator)
        point = cells_to_model(rc, gt.shape[-1], img_size)
        box, _ = jittered_boxes(gt, input_size, img_size, generator, noise_frac, max_noise)
        coords = torch.zeros(b, capacity, 2, device=device)
        labels = torch.full((b, capacity), PAD, dtype=torch.long, device=device)
        coords[:, 0] = torch.where(is_box[:, None], box[:, :2], point)
        coords[:, 1] = torch.where(is_box[:, None], box[:, 2:], coords[:, 1])
        labels[:, 0] = torch.where(is_box, BOX_TL, FOREGROUND)
        labels[:, 1] = torch.where(is_box, BOX_BR, PAD)
        count = torch.where(is_box, 2, 1).to(device)
        return cls(coords, labels, count, is_box)

    def add(self, xy: torch.Tensor, labels: torch.Tensor, found: torch.Tensor) -> None:
        """Append one point to every sample with ``found``."""
        if bool((self.count[found] >= self.labels.shape[1]).any()):
            raise ValueError(f"prompt capacity {self.labels.shape[1]} exceeded")
        rows = torch.nonzero(found).squeeze(1)
        slot = self.count[rows]
        self.coords[rows, slot] = xy[rows]
        self.labels[rows, slot] = labels[rows]
        self.count = self.count + found.long()

    def multimask(self) -> torch.Tensor:
        """``B`` bool: a single point (no box) -> use the three ambiguity outputs."""
        return (~self.is_box) & (self.count == 1)

    def token_groups(self) -> List[Tuple[torch.Tensor, int]]:
        """Samples grouped by token count, as the reference encodes them: point prompts get one
        padding token after their points, box prompts none. Returns ``[(indices, T), ...]``;
        ``coords[indices, :T]`` / ``labels[indices, :T]`` are the tokens of one group."""
        tokens = self.count + (~self.is_box).long()
        groups = []
        for t in torch.unique(tokens).tolist():
            groups.append((torch.nonzero(tokens == t).squeeze(1), int(t)))
        return groups
