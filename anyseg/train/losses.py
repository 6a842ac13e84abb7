"""SAM's training losses: focal + dice on mask logits (20 : 1), minimum over the candidate outputs,
plus the mean squared error between the IoU head and each mask's actual IoU.

All per-mask functions take logits ``... x H x W`` and targets of the same shape (float in {0, 1} or
soft), an optional ``weight`` (1 = pixel counts, 0 = ignored, e.g. the padding of the model input),
and return one value per mask (shape ``...``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


def _weights(targets: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    if weight is None:
        return torch.ones_like(targets)
    return weight.to(targets.dtype).expand_as(targets)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, weight: Optional[torch.Tensor] = None,
                       alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al.) averaged over the weighted pixels of each mask.

    Per pixel: ``a_t * (1 - p_t) ** gamma * BCE(logit, t)`` with ``p_t = p t + (1 - p)(1 - t)`` and
    ``a_t = alpha t + (1 - alpha)(1 - t)`` (no alpha weighting when ``alpha < 0``)."""
    logits, targets = logits.float(), targets.float()
    w = _weights(targets, weight)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return (loss * w).sum(dim=(-2, -1)) / w.sum(dim=(-2, -1)).clamp(min=1.0)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weight: Optional[torch.Tensor] = None,
              smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` over the weighted pixels, p = sigmoid."""
    logits, targets = logits.float(), targets.float()
    w = _weights(targets, weight)
    p = torch.sigmoid(logits) * w
    t = targets * w
    inter = (p * t).sum(dim=(-2, -1))
    return 1 - (2 * inter + smooth) / (p.sum(dim=(-2, -1)) + t.sum(dim=(-2, -1)) + smooth)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, weight: Optional[torch.Tensor] = None,
             threshold: float = 0.0) -> torch.Tensor:
    """IoU of ``logits > threshold`` with ``targets > 0.5`` over the weighted pixels (1 when both are
    empty). Not differentiable: it is the target of the IoU head."""
    pred = logits.detach() > threshold
    gt = targets > 0.5
    if weight is not None:
        keep = weight.expand_as(gt) > 0
        pred, gt = pred & keep, gt & keep
    inter = (pred & gt).sum(dim=(-2, -1)).float()
    union = (pred | gt).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


class SamLoss(NamedTuple):
    """total: scalar; the rest are ``B`` per-sample values of the chosen (lowest-loss) output."""

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou_mse: torch.Tensor
    iou: torch.Tensor
    chosen: torch.Tensor


def sam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor,
             weight: Optional[torch.Tensor] = None, focal_weight: float = FOCAL_WEIGHT,
             dice_weight: float = DICE_WEIGHT, iou_weight: float = IOU_WEIGHT, focal_alpha: float = 0.25,
             focal_gamma: float = 2.0) -> SamLoss:
    """SAM's loss for ``B`` samples with ``k`` outputs each.

    Args:
        logits: ``B x k x H x W`` mask logits; iou_pred: ``B x k`` IoU head outputs.
        target: ``B x H x W`` ground truth; weight: ``B x H x W`` (or None).
        candidates: ``B x k`` bool, the outputs that count for each sample (the three ambiguity masks
            for a single point, the single-mask output otherwise).
    The mask loss ``focal_weight * focal + dice_weight * dice`` is the minimum over the candidates;
    the IoU loss is the MSE over all candidates (focal: ``focal_alpha`` < 0 turns the class weighting off). ``total`` is the mean over samples of
    ``mask loss + iou_weight * iou loss``.
    """
    if logits.shape[:2] != candidates.shape or iou_pred.shape != candidates.shape:
        raise ValueError(f"expected logits B x k x H x W, iou_pred and candidates B x k; got {tuple(logits.shape)}, "
                         f"{tuple(iou_pred.shape)}, {tuple(candidates.shape)}")
    tgt = target[:, None].float().expand_as(logits)
    w = None if weight is None else weight[:, None].expand_as(logits)
    focal = sigmoid_focal_loss(logits, tgt, w, alpha=focal_alpha, gamma=focal_gamma)
    dice = dice_loss(logits, tgt, w)
    iou = mask_iou(logits, tgt, w)
    mask_loss = focal_weight * focal + dice_weight * dice
    masked = torch.where(candidates, mask_loss, torch.full_like(mask_loss, float("inf")))
    chosen = masked.argmin(dim=1)
    rows = torch.arange(len(chosen), device=chosen.device)
    se = (iou_pred.float() - iou) ** 2
    n_cand = candidates.sum(dim=1).clamp(min=1)
    iou_mse = (se * candidates).sum(dim=1) / n_cand
    per_sample = mask_loss[rows, chosen] + iou_weight * iou_mse
    return SamLoss(per_sample.mean(), focal[rows, chosen], dice[rows, chosen], iou_mse, iou[rows, chosen], chosen)
