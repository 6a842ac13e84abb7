"""Golden parity of segment-everything: every AMG case of both golden models (golden/README.md).

Same number of records in the same order; per record mask IoU >= 0.99, predicted_iou and
stability_score within 1e-3, bbox within 2 px, point_coords and crop_box exact.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from anyseg import MaskGenerator, SamAutomaticMaskGenerator, load_model
from anyseg.imageio import load_image
from anyseg.masks import coco_rle_to_mask

from conftest import mask_iou

CASES = [(model, i) for model in ("vit_small", "mobilesam") for i in range(3)]


@pytest.fixture(scope="module")
def models(golden_dir, manifest):
    return {name: load_model(golden_dir / manifest[name]["checkpoint"]) for name in ("vit_small", "mobilesam")}


@pytest.mark.parametrize("model_name,case", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_amg_matches_reference(model_name, case, models, manifest, golden_dir, images_dir):
    spec = manifest[model_name]["amg"][case]
    golden = json.loads((golden_dir / spec["file"]).read_text())
    assert len(golden["masks"]) == spec["n_masks"]
    image = load_image(images_dir / golden["image"])
    generator = MaskGenerator(models[model_name], output_mode=golden["output_mode"], **golden["params"])
    records = generator.generate(image)

    assert len(records) == len(golden["masks"])
    for i, (ours, ref) in enumerate(zip(records, golden["masks"])):
        assert ours["segmentation"]["size"] == ref["segmentation"]["size"]
        iou = mask_iou(coco_rle_to_mask(ours["segmentation"]), coco_rle_to_mask(ref["segmentation"]))
        assert iou >= 0.99, f"record {i}: mask IoU {iou:.4f}"
        assert ours["area"] == pytest.approx(ref["area"], rel=0.02, abs=5), f"record {i}"
        assert abs(ours["predicted_iou"] - ref["predicted_iou"]) <= 1e-3, f"record {i}"
        assert abs(ours["stability_score"] - ref["stability_score"]) <= 1e-3, f"record {i}"
        assert np.max(np.abs(np.subtract(ours["bbox"], ref["bbox"]))) <= 2, f"record {i}"
        assert ours["point_coords"] == ref["point_coords"], f"record {i}"
        assert ours["crop_box"] == ref["crop_box"], f"record {i}"


def test_reference_name_is_the_same_class():
    assert SamAutomaticMaskGenerator is MaskGenerator


def test_memory_budget_does_not_change_records(models, images_dir):
    """Upscaling in chunks of one mask gives the same records as the default budget."""
    image = load_image(images_dir / "groceries.jpg")[::4, ::4].copy()
    params = dict(points_per_side=4, pred_iou_thresh=-100.0, stability_score_thresh=-1.0, box_nms_thresh=1.0,
                  output_mode="uncompressed_rle")
    a = MaskGenerator(models["mobilesam"], **params).generate(image)
    b = MaskGenerator(models["mobilesam"], max_chunk_pixels=1, **params).generate(image)
    assert len(a) == len(b) == 48
    for ra, rb in zip(a, b):
        assert ra["segmentation"] == rb["segmentation"]
        assert ra["predicted_iou"] == rb["predicted_iou"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(points_per_side=0), "points_per_side"),
        (dict(points_per_side=None), "exactly one"),
        (dict(output_mode="png"), "output_mode"),
        (dict(box_nms_thresh=1.5), "box_nms_thresh"),
        (dict(points_per_side=None, point_grids=[np.zeros((0, 2))]), "N x 2"),
        (dict(points_per_side=None, point_grids=[np.full((4, 2), 2.0)]), r"\[0, 1\]"),
        (dict(crop_n_points_downscale_factor=0), "crop_n_points_downscale_factor"),
    ],
)
def test_bad_parameters_say_what_was_expected(models, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskGenerator(models["mobilesam"], **kwargs)


def test_bad_image_is_a_value_error(models):
    gen = MaskGenerator(models["mobilesam"], points_per_side=2)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        gen.generate(np.zeros((10, 10), np.float32))
