"""Tests for the pure mask / box helpers in ``anyseg.masks``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from anyseg import masks as M
from conftest import unpack_masks


def _unpack(packed, shape) -> np.ndarray:
    return unpack_masks(np.asarray(packed, dtype=np.uint8), shape)


# --------------------------------------------------------------------------------------------------
# Reference tables
# --------------------------------------------------------------------------------------------------


@pytest.mark.golden
def test_crop_boxes_match_reference(amg_helpers):
    cases = amg_helpers["crop_boxes"]
    assert len(cases) > 0
    for case in cases:
        boxes, layers = M.generate_crop_boxes(tuple(case["im_size"]), case["n_layers"], case["overlap_ratio"])
        assert boxes == case["boxes"], case["im_size"]
        assert layers == case["layer_idxs"], case["im_size"]


@pytest.mark.golden
def test_point_grids_match_reference(amg_helpers):
    for case in amg_helpers["point_grids"]:
        grids = M.build_all_layer_point_grids(case["n_per_side"], case["n_layers"], case["scale_per_layer"])
        assert len(grids) == len(case["grids"])
        for ours, ref in zip(grids, case["grids"]):
            ref = np.asarray(ref, dtype=np.float64)
            assert ours.shape == ref.shape
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.golden
def test_near_crop_edge_matches_reference(amg_helpers):
    for case in amg_helpers["near_crop_edge"]:
        boxes = torch.tensor(case["boxes_in_crop"])
        near = M.is_box_near_crop_edge(boxes, case["crop_box"], case["orig_box"])
        assert near.dtype == torch.bool
        assert near.tolist() == case["near"], case["crop_box"]


@pytest.mark.golden
def test_mask_to_box_matches_reference(amg_helpers):
    table = amg_helpers["mask_to_box"]
    masks = torch.from_numpy(_unpack(table["masks_packed"], table["shape"]))
    assert M.batched_mask_to_box(masks).tolist() == table["boxes"]
    # Any leading batch shape works and agrees with the flat result.
    boxes = M.batched_mask_to_box(masks.reshape(2, -1, *masks.shape[1:]))
    assert boxes.reshape(-1, 4).tolist() == table["boxes"]


@pytest.mark.golden
def test_stability_matches_reference(amg_helpers):
    logits = torch.tensor(amg_helpers["stability_logits"], dtype=torch.float32)
    for case in amg_helpers["stability"]:
        scores = M.calculate_stability_score(logits, case["threshold"], case["offset"])
        assert scores.dtype == torch.float32
        np.testing.assert_allclose(scores.numpy(), np.asarray(case["scores"]), rtol=0, atol=1e-6)


@pytest.mark.golden
def test_small_regions_match_reference(amg_helpers):
    cases = amg_helpers["small_regions"]
    assert {c["mode"] for c in cases} == {"holes", "islands"}
    for case in cases:
        mask = _unpack(case["mask_packed"], case["shape"])
        expected = _unpack(case["result_packed"], case["shape"])
        result, changed = M.remove_small_regions(mask, case["area_thresh"], case["mode"])
        assert changed == case["changed"], (case["mode"], case["area_thresh"])
        np.testing.assert_array_equal(result, expected)


# --------------------------------------------------------------------------------------------------
# Point grids and crops
# --------------------------------------------------------------------------------------------------


def test_point_grid_layout():
    grid = M.build_point_grid(4)
    assert grid.shape == (16, 2)
    np.testing.assert_allclose(grid[:4, 0], [0.125, 0.375, 0.625, 0.875])  # x varies fastest
    np.testing.assert_allclose(grid[:4, 1], 0.125)
    np.testing.assert_allclose(M.build_point_grid(1), [[0.5, 0.5]])


@pytest.mark.parametrize("n", [0, -3])
def test_point_grid_needs_a_point(n):
    with pytest.raises(ValueError, match="at least 1 point per side"):
        M.build_point_grid(n)


def test_layer_grid_with_zero_points_raises():
    # int(3 / 2**2) == 0: the reference divides by zero here.
    with pytest.raises(ValueError, match="crop layer 2"):
        M.build_all_layer_point_grids(3, 2, 2)
    assert [len(g) for g in M.build_all_layer_point_grids(3, 1, 2)] == [9, 1]


def test_crop_boxes_cover_the_image():
    h, w = 301, 455
    boxes, layers = M.generate_crop_boxes((h, w), 2, 512 / 1500)
    assert layers == [0] + [1] * 4 + [2] * 16
    covered = np.zeros((h, w), dtype=int)
    for (x0, y0, x1, y1), layer in zip(boxes, layers):
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        if layer == 2:
            covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1


def test_uncrop_helpers():
    crop = [10, 20, 40, 35]
    boxes = torch.tensor([[0, 0, 5, 5], [1, 2, 3, 4]])
    assert M.uncrop_boxes_xyxy(boxes, crop).tolist() == [[10, 20, 15, 25], [11, 22, 13, 24]]
    points = torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    assert M.uncrop_points(points, crop).tolist() == [[10.5, 21.5]]
    masks = torch.zeros(2, 15, 30, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1, -1, -1] = True
    full = M.uncrop_masks(masks, crop, 50, 60)
    assert full.shape == (2, 50, 60)
    assert full[0, 20, 10] and full[1, 34, 39] and int(full.sum()) == 2
    assert M.uncrop_masks(masks, [0, 0, 30, 15], 15, 30) is masks


# --------------------------------------------------------------------------------------------------
# Boxes and NMS
# --------------------------------------------------------------------------------------------------


def test_mask_to_box_edge_cases():
    masks = torch.zeros(4, 5, 7, dtype=torch.bool)
    masks[1] = True
    masks[2, 3, 6] = True
    masks[3, 1:3, 2] = True
    masks[3, 4, 5] = True
    assert M.batched_mask_to_box(masks).tolist() == [[0, 0, 0, 0], [0, 0, 6, 4], [6, 3, 6, 3], [2, 1, 5, 4]]
    assert M.batched_mask_to_box(torch.zeros(0, 5, 7, dtype=torch.bool)).shape == (0, 4)


def test_box_conversions():
    boxes = torch.tensor([[1.0, 2.0, 4.0, 8.0], [0.0, 0.0, 2.0, 2.0]])
    assert M.box_xyxy_to_xywh(boxes).tolist() == [[1, 2, 3, 6], [0, 0, 2, 2]]
    assert boxes[0, 2] == 4.0  # input untouched
    assert M.box_xyxy_to_xywh([1, 2, 4, 8]) == [1, 2, 3, 6]
    assert M.box_area(boxes).tolist() == [18.0, 4.0]
    iou = M.box_iou(boxes, torch.tensor([[1.0, 2.0, 4.0, 8.0], [1.0, 1.0, 3.0, 3.0]]))
    np.testing.assert_allclose(iou.numpy(), [[1.0, 2 / 20], [0.0, 1 / 7]], rtol=1e-6)


def _brute_force_nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list:
    """Textbook greedy NMS, one pair at a time."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable
    keep = []
    for i in order:
        ok = True
        for j in keep:
            a, b = boxes[i], boxes[j]
            iw = max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            area_a = (a[2] - a[0]) * (a[3] - a[1])
            area_b = (b[2] - b[0]) * (b[3] - b[1])
            with np.errstate(invalid="ignore", divide="ignore"):
                if inter / (area_b + area_a - inter) > np.float32(thresh):
                    ok = False
                    break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.7, 1.0])
def test_nms_matches_brute_force(seed, thresh):
    rng = np.random.default_rng(seed)
    n = 300
    xy = rng.integers(0, 100, size=(n, 2))
    wh = rng.integers(0, 40, size=(n, 2))  # includes zero-area boxes
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    boxes[n // 2 :: 7] = boxes[n // 2 - 1]  # duplicates
    scores = rng.integers(0, 20, size=n).astype(np.float32)  # many ties
    keep = M.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thresh)
    assert keep.dtype == torch.int64
    assert keep.tolist() == _brute_force_nms(boxes, scores, thresh)


def test_nms_identical_boxes_and_empty():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    scores = torch.tensor([0.5, 0.9, 0.9])
    assert M.nms(boxes, scores, 1.0).tolist() == [1, 2, 0]  # IoU 1.0 is not > 1.0
    assert M.nms(boxes, scores, 0.99).tolist() == [1]
    assert M.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError, match="N x 4"):
        M.nms(torch.zeros(3, 5), torch.zeros(3), 0.5)


def test_nms_is_fast_on_thousands_of_boxes():
    import time

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 2000, size=(5000, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(1, 300, size=(5000, 2))], axis=1)).float()
    start = time.perf_counter()
    keep = M.nms(boxes, torch.rand(5000), 0.7)
    elapsed = time.perf_counter() - start
    assert 0 < len(keep) <= 5000
    assert elapsed < 10.0  # generous: a pure-Python O(N^2) loop takes minutes


# --------------------------------------------------------------------------------------------------
# RLE
# --------------------------------------------------------------------------------------------------


def _edge_case_masks(h=6, w=5) -> torch.Tensor:
    masks = torch.zeros(6, h, w, dtype=torch.bool)
    masks[1] = True  # full
    masks[2, 2, 3] = True  # single pixel
    masks[3, 0, 0] = True  # first pixel set
    masks[4, :, -1] = True  # last column
    masks[5, -1, -1] = True  # last pixel only
    return masks


def test_rle_edge_cases():
    rles = M.mask_to_rle(_edge_case_masks())
    assert rles[0] == {"size": [6, 5], "counts": [30]}
    assert rles[1] == {"size": [6, 5], "counts": [0, 30]}
    assert rles[2]["counts"] == [3 * 6 + 2, 1, 30 - 21]
    assert rles[3]["counts"] == [0, 1, 29]
    assert rles[4]["counts"] == [24, 6]
    assert rles[5]["counts"] == [29, 1]
    for rle, mask in zip(rles, _edge_case_masks()):
        assert all(isinstance(c, int) for c in rle["counts"])
        np.testing.assert_array_equal(M.rle_to_mask(rle), mask.numpy())
        assert M.area_from_rle(rle) == int(mask.sum())


@pytest.mark.parametrize("seed", range(3))
def test_rle_round_trip_random(seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = 37, 53
    noise = torch.rand(8, h, w, generator=gen) < torch.linspace(0.0, 1.0, 8)[:, None, None]
    blobs = torch.nn.functional.interpolate(torch.randn(8, 1, 5, 7, generator=gen), size=(h, w), mode="bilinear")
    masks = torch.cat([noise, blobs[:, 0] > 0])
    rles = M.mask_to_rle(masks)
    for rle, mask in zip(rles, masks):
        assert rle["size"] == [h, w]
        assert sum(rle["counts"]) == h * w
        assert all(c > 0 for c in rle["counts"][1:])
        decoded = M.rle_to_mask(rle)
        assert decoded.dtype == bool and decoded.shape == (h, w)
        np.testing.assert_array_equal(decoded, mask.numpy())
        assert M.area_from_rle(rle) == int(mask.sum())


def test_coco_rle_equals_pycocotools():
    gen = torch.Generator().manual_seed(7)
    masks = torch.cat([_edge_case_masks(), torch.rand(4, 6, 5, generator=gen) > 0.5])
    for rle, mask in zip(M.mask_to_rle(masks), masks):
        coco = M.coco_encode_rle(rle)
        expected = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        assert coco["size"] == list(expected["size"])
        assert isinstance(coco["counts"], str)
        assert coco["counts"] == expected["counts"].decode("utf-8")
        np.testing.assert_array_equal(M.coco_rle_to_mask(coco), mask.numpy())


def test_rle_rejects_bad_input():
    with pytest.raises(ValueError, match="B x H x W"):
        M.mask_to_rle(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="sum to"):
        M.rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_mask_to_rle_is_vectorised():
    import time

    masks = torch.rand(64, 512, 512) > 0.5  # ~8M runs in total
    start = time.perf_counter()
    rles = M.mask_to_rle(masks[:, :256] | masks[:, 256:])
    assert len(rles) == 64
    assert time.perf_counter() - start < 20.0


# --------------------------------------------------------------------------------------------------
# Small regions
# --------------------------------------------------------------------------------------------------


def test_small_regions_basic():
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a one-pixel hole
    mask[8, 8] = True  # a one-pixel island, diagonal neighbour below
    mask[9, 9] = True
    filled, changed = M.remove_small_regions(mask, 2, "holes")
    assert changed and filled[3, 3] and filled.sum() == mask.sum() + 1
    same, changed = M.remove_small_regions(filled, 3, "islands")  # the diagonal pair is 8-connected: 2 px
    assert changed and not same[8, 8] and not same[9, 9] and same[1:6, 1:6].all()
    unchanged, changed = M.remove_small_regions(mask, 1, "islands")
    assert not changed and unchanged is not None and np.array_equal(unchanged, mask)
    # Everything below the threshold: the largest island is kept.
    largest, changed = M.remove_small_regions(mask, 1000, "islands")
    assert changed and largest.sum() == 24 and not largest[8, 8]
    with pytest.raises(ValueError, match="holes"):
        M.remove_small_regions(mask, 10, "both")
