"""Overlays and label-map colouring."""
from __future__ import annotations

import numpy as np
import pytest

from anyseg.visualize import colorize_labels, overlay_masks, palette, side_by_side


def test_palette_is_stable_and_distinct():
    a, b = palette(40), palette(40)
    assert a.shape == (40, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert len({tuple(c) for c in a}) == 40


def test_overlay_touches_only_masked_pixels_and_draws_small_on_top():
    image = np.full((40, 60, 3), 100, np.uint8)
    big = np.zeros((40, 60), bool)
    big[5:35, 5:55] = True
    small = np.zeros((40, 60), bool)
    small[15:25, 20:30] = True
    out = overlay_masks(image, np.stack([small, big]), alpha=1.0, outline=False)
    colours = palette(2)
    assert np.array_equal(out[~big], image[~big])
    assert np.array_equal(out[20, 25], colours[0]), "the smaller mask is painted last"
    assert np.array_equal(out[8, 8], colours[1])


def test_overlay_draws_points_and_boxes():
    image = np.zeros((50, 50, 3), np.uint8)
    out = overlay_masks(image, np.zeros((0, 50, 50), bool), points=[[10, 10], [40, 40]], point_labels=[1, 0],
                        boxes=[[2, 2, 47, 47]])
    assert out[10, 10, 1] > 150 and out[10, 10, 0] < 50   # green foreground click
    assert out[40, 40, 0] > 150 and out[40, 40, 1] < 50   # red background click
    assert tuple(out[2, 25]) == (255, 255, 0)              # yellow box edge


@pytest.mark.parametrize("image,masks,match", [
    (np.zeros((4, 4), np.uint8), np.zeros((1, 4, 4), bool), "H x W x 3 uint8"),
    (np.zeros((4, 4, 3), np.float32), np.zeros((1, 4, 4), bool), "H x W x 3 uint8"),
    (np.zeros((4, 4, 3), np.uint8), np.zeros((1, 5, 4), bool), "image's size"),
])
def test_overlay_rejects_bad_input(image, masks, match):
    with pytest.raises(ValueError, match=match):
        overlay_masks(image, masks)


def test_overlay_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        overlay_masks(np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4, 4), bool), points=[[1, 1]], point_labels=[1, 0])


def test_colorize_labels():
    labels = np.array([[0, 1], [2, 1]], np.uint16)
    rgb = colorize_labels(labels)
    assert rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    assert np.array_equal(rgb[0, 1], rgb[1, 1]) and not np.array_equal(rgb[0, 1], rgb[1, 0])
    with pytest.raises(ValueError, match="integer"):
        colorize_labels(np.zeros((2, 2), np.float32))


def test_side_by_side():
    out = side_by_side([np.zeros((4, 5, 3), np.uint8), np.zeros((6, 2, 3), np.uint8)], gap=3)
    assert out.shape == (6, 10, 3)
    assert out[5, 0].tolist() == [255, 255, 255] and out[5, 8].tolist() == [0, 0, 0]
