"""Masks <-> polygons: exact tracing, holes, connectivity, simplification, COCO / YOLO export."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from anyseg.polygons import (
    Polygon,
    mask_to_polygons,
    merge_rings,
    polygons_to_mask,
    to_coco_segmentation,
    to_yolo_seg_line,
)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def signed_area(ring) -> float:
    p = np.asarray(ring, dtype=np.float64)
    return 0.5 * float(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(np.roll(p[:, 0], -1), p[:, 1]))


def count_holes(mask: np.ndarray, connectivity: int) -> int:
    """Regions of unset pixels not reaching the border (unset pixels use the other connectivity)."""
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 8 else 2)
    labels, n = ndimage.label(~mask, structure=structure)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return n - int(np.count_nonzero(border))


def coco_decode(segmentation, shape) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if not segmentation:
        return np.zeros(shape, bool)
    rles = mask_utils.frPyObjects(segmentation, int(shape[0]), int(shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2 copy keyword
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def ring_with_hole_and_island(h=40, w=50) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    r2 = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
    mask = r2 < 18**2
    mask &= ~(r2 < 10**2)  # hole
    mask |= r2 < 4**2  # island inside the hole
    return mask


def random_mask(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 48, size=2)
    mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)
    if seed % 2:
        mask = ndimage.binary_opening(mask)  # blobbier shapes with holes
    return mask


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", range(40))
def test_random_masks_round_trip_exactly(seed, connectivity):
    mask = random_mask(seed)
    polygons = mask_to_polygons(mask, connectivity=connectivity)
    np.testing.assert_array_equal(polygons_to_mask(polygons, mask.shape), mask)
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    labels, n = ndimage.label(mask, structure=structure)
    assert len(polygons) == n
    assert sum(len(p.holes) for p in polygons) == count_holes(mask, connectivity)
    # Each polygon is exactly one component, and its area is that component's pixel count.
    for polygon in polygons:
        alone = polygons_to_mask([polygon], mask.shape)
        ids = np.unique(labels[alone])
        assert len(ids) == 1 and ids[0] > 0
        np.testing.assert_array_equal(alone, labels == ids[0])
        assert polygon.area == alone.sum()


def test_hole_with_island_inside():
    mask = ring_with_hole_and_island()
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    outer = max(polygons, key=lambda p: p.area)
    inner = min(polygons, key=lambda p: p.area)
    assert len(outer.holes) == 1 and inner.holes == []
    np.testing.assert_array_equal(polygons_to_mask(polygons, mask.shape), mask)
    # The hole ring alone (as a bare ring) covers the hole and the island together.
    hole_region = polygons_to_mask([outer.holes[0]], mask.shape)
    assert hole_region.sum() == (ndimage.binary_fill_holes(mask) & ~mask).sum() + inner.area


def test_orientation_exterior_ccw_holes_cw():
    # Counter-clockwise on screen (y down) is a negative shoelace area in XY; holes are the reverse.
    outer = max(mask_to_polygons(ring_with_hole_and_island()), key=lambda p: p.area)
    assert signed_area(outer.exterior) < 0
    assert all(signed_area(h) > 0 for h in outer.holes)


def test_edge_cases():
    assert mask_to_polygons(np.zeros((5, 7), bool)) == []
    assert mask_to_polygons(np.zeros((0, 0), bool)) == []
    full = mask_to_polygons(np.ones((3, 4), bool))
    assert len(full) == 1 and full[0].holes == []
    assert sorted(full[0].exterior) == [(0.0, 0.0), (0.0, 3.0), (4.0, 0.0), (4.0, 3.0)]
    single = np.zeros((6, 6), bool)
    single[5, 0] = True  # bottom-left corner, touching two borders
    (p,) = mask_to_polygons(single)
    assert sorted(p.exterior) == [(0.0, 5.0), (0.0, 6.0), (1.0, 5.0), (1.0, 6.0)]
    np.testing.assert_array_equal(polygons_to_mask([p], single.shape), single)
    border = np.zeros((8, 9), bool)
    border[:, -1] = border[-1, :] = True  # an L along two image borders
    np.testing.assert_array_equal(polygons_to_mask(mask_to_polygons(border), border.shape), border)


def test_thin_shapes_and_connectivity():
    diag = np.eye(6, dtype=bool)
    assert len(mask_to_polygons(diag, connectivity=8)) == 1
    assert len(mask_to_polygons(diag, connectivity=4)) == 6
    for conn in (4, 8):
        np.testing.assert_array_equal(polygons_to_mask(mask_to_polygons(diag, connectivity=conn), diag.shape), diag)
    cross = np.zeros((9, 11), bool)
    cross[4, :] = cross[:, 5] = True
    (p,) = mask_to_polygons(cross)
    assert len(p.exterior) == 12  # only corners are kept
    np.testing.assert_array_equal(polygons_to_mask([p], cross.shape), cross)
    # A checkerboard: diagonal contacts everywhere, one 8-connected piece with many holes.
    board = (np.indices((7, 7)).sum(0) % 2 == 0)
    polys = mask_to_polygons(board)
    assert len(polys) == 1 and len(polys[0].holes) == count_holes(board, 8)
    np.testing.assert_array_equal(polygons_to_mask(polys, board.shape), board)


def test_simplification_keeps_iou_and_reduces_vertices():
    yy, xx = np.mgrid[:120, :140]
    r2 = (yy - 60) ** 2 + (xx - 70) ** 2
    mask = (r2 < 50**2) & ~(r2 < 20**2)
    exact = mask_to_polygons(mask)
    simple = mask_to_polygons(mask, tolerance=1.0)
    assert len(simple) == 1 and len(simple[0].holes) == 1
    n_exact = len(exact[0].exterior) + len(exact[0].holes[0])
    n_simple = len(simple[0].exterior) + len(simple[0].holes[0])
    assert n_simple < n_exact / 3
    assert iou(polygons_to_mask(simple, mask.shape), mask) >= 0.98


def test_min_area_drops_specks_and_fills_small_holes():
    mask = np.zeros((30, 30), bool)
    mask[2:20, 2:20] = True
    mask[8:10, 8:10] = False  # 4-pixel hole
    mask[25, 25] = True  # 1-pixel speck
    polys = mask_to_polygons(mask, min_area=5)
    assert len(polys) == 1 and polys[0].holes == []
    expected = np.zeros_like(mask)
    expected[2:20, 2:20] = True
    np.testing.assert_array_equal(polygons_to_mask(polys, mask.shape), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="connectivity"):
        mask_to_polygons(np.ones((2, 2), bool), connectivity=6)
    with pytest.raises(ValueError, match="tolerance"):
        mask_to_polygons(np.ones((2, 2), bool), tolerance=-1)
    with pytest.raises(ValueError, match="even number"):
        polygons_to_mask([[0, 0, 1, 1, 2]], (3, 3))
    with pytest.raises(ValueError, match="exterior"):
        polygons_to_mask([{"holes": []}], (3, 3))
    with pytest.raises(ValueError, match="positive"):
        to_yolo_seg_line(0, [], 0, 10)


def test_rasterise_accepts_dicts_flat_rings_and_polygon_objects():
    square = [(1.0, 1.0), (1.0, 4.0), (4.0, 4.0), (4.0, 1.0)]
    hole = [(2.0, 2.0), (3.0, 2.0), (3.0, 3.0), (2.0, 3.0)]
    expected = np.zeros((6, 6), bool)
    expected[1:4, 1:4] = True
    expected[2, 2] = False
    as_obj = polygons_to_mask([Polygon(square, [hole])], (6, 6))
    as_dict = polygons_to_mask([Polygon(square, [hole]).to_dict()], (6, 6))
    np.testing.assert_array_equal(as_obj, expected)
    np.testing.assert_array_equal(as_dict, expected)
    flat = polygons_to_mask([[v for xy in square for v in xy]], (6, 6))  # a bare ring: no hole
    filled = expected.copy()
    filled[2, 2] = True
    np.testing.assert_array_equal(flat, filled)


@pytest.mark.parametrize("seed", range(12))
def test_coco_polygons_decode_with_pycocotools(seed):
    mask = ring_with_hole_and_island() if seed == 0 else random_mask(seed)
    seg = to_coco_segmentation(mask_to_polygons(mask))
    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in seg)
    # pycocotools fills pixel-corner polygons exactly; holes survive the single-ring bridging.
    np.testing.assert_array_equal(coco_decode(seg, mask.shape), mask)


def test_simplified_coco_polygons_keep_iou():
    yy, xx = np.mgrid[:120, :140]
    r2 = (yy - 60) ** 2 + (xx - 70) ** 2
    mask = (r2 < 50**2) & ~(r2 < 20**2)
    seg = to_coco_segmentation(mask_to_polygons(mask, tolerance=1.0))
    assert iou(coco_decode(seg, mask.shape), mask) >= 0.98


def test_merge_rings_bridges_add_no_area():
    mask = ring_with_hole_and_island()
    rings = [r for p in mask_to_polygons(mask) for r in [p.exterior, *p.holes]]
    merged = merge_rings(rings)
    assert merged.shape == (sum(len(r) for r in rings) + 2 * (len(rings) - 1), 2)
    np.testing.assert_array_equal(polygons_to_mask([merged], mask.shape), mask)
    assert merge_rings([]).shape == (0, 2)


def test_yolo_line_round_trip():
    mask = ring_with_hole_and_island(30, 44)
    line = to_yolo_seg_line(3, mask_to_polygons(mask), width=44, height=30)
    fields = line.split()
    assert fields[0] == "3" and len(fields) % 2 == 1
    coords = np.asarray(fields[1:], dtype=np.float64).reshape(-1, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    back = polygons_to_mask([coords * [44, 30]], mask.shape)
    np.testing.assert_array_equal(back, mask)
    assert to_yolo_seg_line(0, [], 10, 10) == ""


def test_large_mask_offset_in_frame():
    # Tracing works inside the bounding box; vertices must come back in the full mask's frame.
    mask = np.zeros((300, 400), bool)
    mask[250:260, 330:345] = True
    (p,) = mask_to_polygons(mask)
    xs, ys = zip(*p.exterior)
    assert (min(xs), max(xs), min(ys), max(ys)) == (330, 345, 250, 260)
