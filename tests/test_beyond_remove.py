"""Object removal: SAM's mask from a click, dilated and filled, ends close to the true background."""
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anyseg import load_model, make_predictor
from anyseg.beyond import MissingExtra
from anyseg.beyond.demo import removal_scene
from anyseg.beyond.remove import CropFiller, dilate_mask, fill, remove_object


@pytest.fixture(scope="module")
def predictor():
    return make_predictor(load_model("nano"))


def _click(mask):
    depth = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(x), float(y)


@pytest.mark.parametrize("filler", ["telea", "biharmonic"])
def test_removed_object_becomes_background(predictor, filler):
    """Mean absolute error over the object's pixels against the scene without it: below 10 grey levels
    (the object differs from the background by about 100; measured 2 to 5)."""
    image, truth, background = removal_scene(seed=0)
    result = remove_object(predictor, image, point=_click(truth), dilate=5, filler=filler)
    assert (result.mask & truth).sum() / (result.mask | truth).sum() > 0.8
    assert result.filled.sum() > result.mask.sum()
    before = np.abs(image[truth].astype(float) - background[truth]).mean()
    after = np.abs(result.image[truth].astype(float) - background[truth]).mean()
    assert before > 50 and after < 10, (before, after)
    outside = ~result.filled
    np.testing.assert_array_equal(result.image[outside], image[outside])


def test_dilate_mask_is_a_disk():
    mask = np.zeros((21, 21), bool)
    mask[10, 10] = True
    grown = dilate_mask(mask, 3)
    assert grown[10, 13] and grown[7, 10] and not grown[10, 14] and not grown[13, 13]
    assert grown.sum() == 29
    with pytest.raises(ValueError, match="non-negative"):
        dilate_mask(mask, -1)


def test_crop_filler_fills_only_the_mask_in_a_crop():
    image, truth, _ = removal_scene(seed=1)
    seen = {}

    def fake(crop, crop_mask):
        seen["shape"], seen["covered"] = crop.shape, crop_mask.mean()
        out = crop.copy()
        out[crop_mask] = (1, 2, 3)
        return out

    filler = CropFiller(fake, size=64, margin=0.5)
    x0, y0, x1, y1 = filler.crop_box(truth)
    ys, xs = np.nonzero(truth)
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1 and (x1 - x0) == (y1 - y0)
    out = fill(image, truth, filler)
    assert seen["shape"] == (64, 64, 3) and 0.2 < seen["covered"] < 0.6
    inner = ndimage.binary_erosion(truth, iterations=4)  # away from the resampled edge
    assert np.abs(out[inner].astype(int) - (1, 2, 3)).max() <= 3
    np.testing.assert_array_equal(out[~truth], image[~truth])


def test_missing_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(MissingExtra, match=r"anyseg\[inpaint\]"):
        fill(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), bool), "telea")


def test_bad_inputs(predictor):
    image, truth, _ = removal_scene(seed=0)
    with pytest.raises(ValueError, match="which object"):
        remove_object(predictor, image)
    with pytest.raises(ValueError, match="unknown filler"):
        fill(image, truth, "magic")


def test_remove_cli(tmp_path):
    from anyseg.cli import main

    image, truth, background = removal_scene(seed=2)
    Image.fromarray(image).save(tmp_path / "scene.png")
    x, y = _click(truth)
    out = tmp_path / "clean.png"
    assert main(["remove", str(tmp_path / "scene.png"), "--point", f"{x:.0f},{y:.0f}", "--dilate", "5", "-o", str(out),
                 "--mask-out", str(tmp_path / "hole.png")]) == 0
    clean = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert np.abs(clean[truth] - background[truth]).mean() < 10
    assert (np.asarray(Image.open(tmp_path / "hole.png")) > 0).sum() >= truth.sum()
    assert main(["remove", str(tmp_path / "scene.png"), "-o", str(out)]) == 2  # no prompt: a clear error
