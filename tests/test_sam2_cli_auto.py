"""End-to-end: ``anyseg auto`` with the golden SAM 2.1 checkpoint on groceries.jpg, checked against the
Python API's records, then resumed."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from anyseg import formats
from anyseg.cli import auto, build_parser, main
from conftest import GOLDEN, IMAGES, _require

SAM2_CHECKPOINT = GOLDEN / "sam2" / "sam2.1_golden.pt"
# Thresholds that keep masks with the golden (random) weights; a 4 x 4 grid in batches of 6.
GENERATOR_ARGS = ["--points-per-side", "4", "--points-per-batch", "6", "--pred-iou-thresh", "0.3",
                  "--stability-score-thresh", "0.3", "--box-nms-thresh", "1"]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sam2_model():
    import anyseg

    return anyseg.load_model(_require(SAM2_CHECKPOINT))


@pytest.mark.slow  # the image is segmented twice (CLI and API) with the faithful SAM 2 decoder
def test_auto_with_sam2_matches_the_api_and_resumes(sam2_model, tmp_path):
    from anyseg.imageio import load_image
    from anyseg.sam2_automatic import SAM2AutomaticMaskGenerator

    image_path = _require(IMAGES) / "groceries.jpg"
    out = tmp_path / "out"
    argv = ["auto", str(image_path), "-o", str(out), "--format", "sa1b,coco,png", "-m", str(SAM2_CHECKPOINT),
            "--speed", "faithful", "--no-progress", *GENERATOR_ARGS]
    status, stdout, stderr = _run(argv)
    assert status == 0, stderr
    assert "1 processed, 0 skipped (already done), 0 failed" in stdout

    image = load_image(image_path)
    h, w = image.shape[:2]
    api = SAM2AutomaticMaskGenerator(sam2_model, points_per_side=4, points_per_batch=6, pred_iou_thresh=0.3,
                                     stability_score_thresh=0.3, box_nms_thresh=1.0,
                                     output_mode="binary_mask").generate(image)
    assert 1 < len(api) < 48, "both filters keep some of the 48 candidates"

    info, records = formats.read_sa1b_json(out / "groceries.json")
    assert (info["width"], info["height"], info["file_name"]) == (w, h, "groceries.jpg")
    assert len(records) == len(api)
    for ours, ref in zip(records, api):
        np.testing.assert_array_equal(ours["segmentation"], ref["segmentation"])
        for key in ("area", "bbox", "point_coords", "crop_box"):
            assert ours[key] == ref[key], key
        for key in ("predicted_iou", "stability_score"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-6), key

    [(coco_image, coco_records)] = formats.read_coco_json(out / auto.COCO_FILE)
    assert coco_image["file_name"] == "groceries.jpg"
    np.testing.assert_array_equal(np.stack([r["segmentation"] for r in coco_records]),
                                  np.stack([r["segmentation"] for r in api]))
    np.testing.assert_array_equal(formats.read_label_png(out / "groceries_labels.png"), formats.label_map(api))
    assert (out / "groceries_overlay.png").is_file()

    marker = json.loads((out / auto.MARKER_DIR / "groceries.done.json").read_text())
    assert marker["masks"] == len(api)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files if p.name != auto.COCO_FILE}
    status, stdout, _ = _run(argv)
    assert status == 0
    assert "0 processed, 1 skipped (already done), 0 failed" in stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a finished image is not redone"
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files


def _generator(argv):
    args = build_parser().parse_args(["auto", "in.jpg", "-o", "out", "--no-progress", *argv])
    return auto._make_generator(args)


def test_options_map_to_the_family_generator(sam2_model, monkeypatch):
    from anyseg.automatic import MaskGenerator
    from anyseg.sam2_automatic import SAM2AutomaticMaskGenerator

    monkeypatch.setattr(auto, "load_model_from_args", lambda args: sam2_model)
    gen = _generator([])
    assert isinstance(gen, SAM2AutomaticMaskGenerator)
    assert (gen.pred_iou_thresh, gen.use_m2m, gen.multimask_output) == (0.8, False, True), "SAM 2's defaults"
    gen = _generator(["--use-m2m", "--single-mask", "--pred-iou-thresh", "0.5", "--min-mask-region-area", "9"])
    assert (gen.pred_iou_thresh, gen.use_m2m, gen.multimask_output) == (0.5, True, False)
    assert gen.predictor.max_hole_area == gen.predictor.max_sprinkle_area == 9
    settings = auto._settings(build_parser().parse_args(["auto", "x", "-o", "o", "--use-m2m"]))
    assert settings["use_m2m"] is True and settings["multimask_output"] is True

    import anyseg

    sam1 = anyseg.load_model(_require(GOLDEN / "mobilesam_checkpoint.pth"))
    monkeypatch.setattr(auto, "load_model_from_args", lambda args: sam1)
    gen = _generator([])
    assert type(gen) is MaskGenerator and gen.pred_iou_thresh == 0.88, "SAM 1's default"
    with pytest.raises(ValueError, match="SAM 2 models only"):
        _generator(["--use-m2m"])
