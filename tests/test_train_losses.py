"""Training losses against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from anyseg.train.losses import dice_loss, mask_iou, sam_loss, sigmoid_focal_loss


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _focal_px(logit: float, t: int, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = _sig(logit)
    if t == 1:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p ** gamma * -math.log(1 - p)


LOGITS = [[0.0, 2.0], [-1.0, 3.0]]
TARGET = [[1, 0], [0, 1]]


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([LOGITS])
    target = torch.tensor([TARGET], dtype=torch.float32)
    expected = sum(_focal_px(LOGITS[r][c], TARGET[r][c]) for r in range(2) for c in range(2)) / 4
    got = sigmoid_focal_loss(logits, target)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # no class weighting when alpha < 0: BCE scaled by (1 - p_t)^gamma
    p = _sig(2.0)
    assert sigmoid_focal_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), alpha=-1).item() == pytest.approx(
        p ** 2 * -math.log(1 - p), rel=1e-5)


def test_focal_loss_ignores_zero_weight_pixels():
    logits = torch.tensor([LOGITS])
    target = torch.tensor([TARGET], dtype=torch.float32)
    weight = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert sigmoid_focal_loss(logits, target, weight).item() == pytest.approx(_focal_px(0.0, 1), rel=1e-5)


def test_dice_loss_matches_hand_computation():
    logits = torch.tensor([LOGITS])
    target = torch.tensor([TARGET], dtype=torch.float32)
    p = [[_sig(v) for v in row] for row in LOGITS]
    inter = p[0][0] + p[1][1]
    total = sum(sum(row) for row in p) + 2
    assert dice_loss(logits, target).item() == pytest.approx(1 - (2 * inter + 1) / (total + 1), rel=1e-5)
    # a confident perfect prediction has (almost) zero dice loss, a confident miss almost one
    big = torch.tensor([[[20.0, -20.0], [-20.0, 20.0]]])
    assert dice_loss(big, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-big, target).item() == pytest.approx(1 - 1 / (2 + 2 + 1), abs=1e-6)  # sum p = sum t = 2


def test_mask_iou_thresholds_logits():
    logits = torch.tensor([LOGITS])  # > 0: (0,1), (1,1)
    target = torch.tensor([TARGET], dtype=torch.float32)  # (0,0), (1,1)
    assert mask_iou(logits, target).item() == pytest.approx(1 / 3)
    assert mask_iou(torch.full((1, 2, 2), -5.0), torch.zeros(1, 2, 2)).item() == 1.0


def test_sam_loss_takes_minimum_over_candidates_and_mse_over_all():
    target = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.float32)
    good = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    bad = -good
    half = torch.tensor([[10.0, 10.0], [-10.0, 10.0]])
    logits = torch.stack([good, bad, half, bad])[None]  # output 0 is perfect but not a candidate
    iou_pred = torch.tensor([[0.9, 0.5, 0.4, 0.1]])
    candidates = torch.tensor([[False, True, True, True]])
    out = sam_loss(logits, iou_pred, target, candidates)
    f = sigmoid_focal_loss(logits, target[:, None].expand_as(logits))[0]
    d = dice_loss(logits, target[:, None].expand_as(logits))[0]
    per = 20 * f + d
    assert int(out.chosen) == 2  # the half-right mask
    actual_iou = torch.tensor([1.0, 0.0, 2 / 3, 0.0])
    mse = ((iou_pred[0, 1:] - actual_iou[1:]) ** 2).mean()
    assert out.iou_mse.item() == pytest.approx(mse.item(), rel=1e-5)
    assert out.total.item() == pytest.approx((per[2] + mse).item(), rel=1e-5)
    assert out.iou.item() == pytest.approx(2 / 3, rel=1e-6)
    # a single-output sample uses only output 0
    single = sam_loss(logits, iou_pred, target, torch.tensor([[True, False, False, False]]))
    assert int(single.chosen) == 0
    assert single.total.item() == pytest.approx((per[0] + (0.9 - 1.0) ** 2).item(), rel=1e-5)


def test_sam_loss_gradient_flows_only_through_chosen_output():
    target = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.float32)
    logits = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    iou_pred = torch.zeros(1, 4, requires_grad=True)
    out = sam_loss(logits, iou_pred, target, torch.tensor([[False, True, True, True]]))
    out.total.backward()
    chosen = int(out.chosen)
    for k in range(4):
        has_grad = bool(logits.grad[0, k].abs().sum() > 0)
        assert has_grad == (k == chosen)
    assert iou_pred.grad[0, 0] == 0 and (iou_pred.grad[0, 1:] != 0).any()


def test_sam_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B x k"):
        sam_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4), torch.zeros(1, 2, 2), torch.ones(1, 4, dtype=torch.bool))
