"""Golden parity of SAM 2 segment-everything (../shared/golden/sam2, README "Segment-everything cases").

Same number of records in the same order (records whose predicted_iou differ by <= 1e-4 may swap); per
record mask IoU >= 0.99, predicted_iou and stability_score within 1e-3, bbox within 2 px, area within
1 %, point_coords and crop_box exact. Cases 1 (crops, m2m, hole filling) and 2 (a 12 x 12 grid) decode
hundreds of prompts with the faithful decoder, so they run in the slow tier.
"""
from __future__ import annotations

import gzip
import json
import sys
import types

import numpy as np
import pytest

from anyseg.masks import coco_rle_to_mask
from anyseg.sam2_automatic import SAM2AutomaticMaskGenerator
from conftest import GOLDEN, IMAGES, _require, mask_iou

pytestmark = pytest.mark.golden

SAM2 = GOLDEN / "sam2"


@pytest.fixture(scope="module")
def sam2_model():
    import anyseg

    return anyseg.load_model(_require(SAM2) / "sam2.1_golden.pt")


@pytest.fixture(scope="module")
def amg_spec():
    manifest = json.loads((_require(SAM2) / "manifest.json").read_text())
    return manifest["amg"], manifest["tolerances"]["amg"]


@pytest.fixture(scope="module")
def groceries():
    from anyseg.imageio import load_image

    return load_image(_require(IMAGES) / "groceries.jpg")


def _read_golden(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def _pair_up(ours, golden, tie_atol):
    """Pair each of our records with the golden record at the same position, or with one of the golden
    records tied with it on predicted_iou (those may come in either order)."""
    assert len(ours) == len(golden), f"{len(ours)} records, golden has {len(golden)}"
    used = set()
    pairs = []
    for i, rec in enumerate(ours):
        tied = [j for j in range(len(golden)) if j not in used
                and abs(golden[j]["predicted_iou"] - golden[i]["predicted_iou"]) <= tie_atol]
        assert tied, f"record {i}: no golden record left at predicted_iou {golden[i]['predicted_iou']}"
        mask = coco_rle_to_mask(rec["segmentation"])
        j = max(tied, key=lambda j: (rec["point_coords"] == golden[j]["point_coords"],
                                      mask_iou(mask, coco_rle_to_mask(golden[j]["segmentation"]))))
        used.add(j)
        pairs.append((i, mask, golden[j]))
    return pairs


CASES = [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", CASES)
def test_amg_matches_reference(case, sam2_model, amg_spec, groceries):
    specs, tol = amg_spec
    spec = specs[case]
    golden = _read_golden(SAM2 / spec["file"])
    assert len(golden["masks"]) == spec["n_masks"]
    generator = SAM2AutomaticMaskGenerator(sam2_model, output_mode=golden["output_mode"], **golden["params"])
    _check_records(generator.generate(groceries), golden, tol, groceries)


@pytest.fixture(scope="module")
def lossless_model():
    import anyseg

    return anyseg.load_model(_require(SAM2) / "sam2.1_golden.pt", speed="lossless")


@pytest.mark.parametrize("case", [0])  # the fast decoder's mask prompts (case 1's m2m): test_sam2_fast.py
def test_lossless_amg_matches_reference(case, lossless_model, amg_spec, groceries):
    """Segment everything through the fast encoder and decoder (``speed="lossless"``, batched points)
    keeps the golden tolerances."""
    from anyseg.speed import get_config

    assert get_config(lossless_model).fast_decoder
    specs, tol = amg_spec
    golden = _read_golden(SAM2 / specs[case]["file"])
    generator = SAM2AutomaticMaskGenerator(lossless_model, output_mode=golden["output_mode"], **golden["params"])
    _check_records(generator.generate(groceries), golden, tol, groceries)


def _check_records(records, golden, tol, groceries):
    for i, mask, ref in _pair_up(records, golden["masks"], tol["tie_atol"]):
        ours = records[i]
        assert ours["segmentation"]["size"] == ref["segmentation"]["size"] == list(groceries.shape[:2])
        iou = mask_iou(mask, coco_rle_to_mask(ref["segmentation"]))
        assert iou >= tol["mask_iou"], f"record {i}: mask IoU {iou:.4f}"
        assert abs(ours["area"] - ref["area"]) <= tol["area_frac"] * ref["area"], f"record {i}: area"
        assert ours["area"] == int(mask.sum())
        for key in ("predicted_iou", "stability_score"):
            assert abs(ours[key] - ref[key]) <= tol["score_atol"], f"record {i}: {key}"
        assert np.max(np.abs(np.subtract(ours["bbox"], ref["bbox"]))) <= tol["bbox_px"], f"record {i}: bbox"
        assert ours["point_coords"] == ref["point_coords"], f"record {i}: point_coords"
        assert ours["crop_box"] == ref["crop_box"], f"record {i}: crop_box"


def test_region_area_goes_to_the_predictor_and_defaults_are_the_references(sam2_model):
    gen = SAM2AutomaticMaskGenerator(sam2_model, min_mask_region_area=25)
    assert gen.predictor.max_hole_area == gen.predictor.max_sprinkle_area == 25
    assert gen.predictor.mask_threshold == 0.0
    gen = SAM2AutomaticMaskGenerator(sam2_model)
    assert (gen.pred_iou_thresh, gen.stability_score_thresh, gen.mask_threshold) == (0.8, 0.95, 0.0)
    assert (gen.use_m2m, gen.multimask_output, gen.output_mode) == (False, True, "binary_mask")
    assert len(gen.point_grids[0]) == 32 * 32


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(points_per_side=0), ValueError, "points_per_side"),
        (dict(points_per_side=None), ValueError, "exactly one"),
        (dict(output_mode="png"), ValueError, "output_mode"),
        (dict(box_nms_thresh=1.5), ValueError, "box_nms_thresh"),
        (dict(mask_threshold="0"), ValueError, "mask_threshold"),
        (dict(use_m2m="yes"), ValueError, "use_m2m"),
        (dict(multimask_output=1), ValueError, "multimask_output"),
        (dict(min_mask_region_area=-1), ValueError, "min_mask_region_area"),
        (dict(pred_iou_threshold=0.5), TypeError, "pred_iou_threshold"),
    ],
)
def test_bad_parameters_say_what_was_expected(sam2_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        SAM2AutomaticMaskGenerator(sam2_model, **kwargs)


def test_a_sam1_model_is_refused(golden_dir):
    import anyseg

    sam1 = anyseg.load_model(golden_dir / "mobilesam_checkpoint.pth")
    with pytest.raises(TypeError, match="SAM 2"):
        SAM2AutomaticMaskGenerator(sam1)


def test_from_pretrained_splits_generator_and_builder_keywords(sam2_model, monkeypatch):
    calls = []

    def build_sam2_hf(model_id, **kwargs):
        calls.append((model_id, kwargs))
        return sam2_model

    monkeypatch.setitem(sys.modules, "anyseg.sam2_build", types.SimpleNamespace(build_sam2_hf=build_sam2_hf))
    gen = SAM2AutomaticMaskGenerator.from_pretrained("facebook/sam2.1-hiera-tiny", device="cpu", points_per_side=8,
                                                     use_m2m=True)
    assert calls == [("facebook/sam2.1-hiera-tiny", {"device": "cpu"})]
    assert gen.model is sam2_model and gen.use_m2m and len(gen.point_grids[0]) == 64
