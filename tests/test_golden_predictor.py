"""Golden parity: SamPredictor against the reference outputs for every predictor case in the manifest."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import anyseg
from anyseg.geometry import boxes_to_model_torch
from conftest import check_golden_outputs, golden_prompt_kwargs, mask_iou

pytestmark = pytest.mark.golden

MODELS = ["vit_small", "mobilesam"]
IMAGES = ["truck.jpg", "dog.jpg"]


@pytest.fixture(scope="module", params=[(m, i) for m in MODELS for i in IMAGES], ids=lambda p: f"{p[0]}-{p[1]}")
def encoded(request, manifest, golden_dir, images_dir):
    """A predictor with the image set, plus the golden entry for that model and image."""
    model_name, image = request.param
    entry = manifest[model_name]
    model = anyseg.load_model(golden_dir / entry["checkpoint"])
    predictor = anyseg.SamPredictor(model)
    predictor.set_image(images_dir / image)
    spec = next(p for p in entry["predictor"] if p["image"] == image)
    golden = np.load(golden_dir / spec["file"])
    return predictor, spec, golden


def test_embedding(encoded):
    predictor, spec, golden = encoded
    assert tuple(predictor.original_size) == tuple(golden["original_size"]) == tuple(spec["image_hw"])
    assert tuple(predictor.input_size) == tuple(golden["input_size"])
    err = (predictor.get_image_embedding() - torch.from_numpy(golden["image_embedding"])).abs().max().item()
    assert err <= 1e-3


def test_prompt_cases(encoded):
    predictor, spec, golden = encoded
    checked = 0
    for case in spec["cases"]:
        name = case["name"]
        if name in ("batched_boxes", "logits_case"):
            continue
        masks, iou, low_res = predictor.predict(**golden_prompt_kwargs(case, golden))
        assert masks.dtype == bool
        check_golden_outputs(name, golden, masks, iou, low_res)
        checked += 1
    assert checked == 6


def test_return_logits(encoded):
    predictor, spec, golden = encoded
    case = next(c for c in spec["cases"] if c["name"] == "logits_case")
    logits, iou, _ = predictor.predict(np.array(case["point_coords"]), np.array(case["point_labels"]),
                                       multimask_output=False, return_logits=True)
    want = golden["logits_case_upscaled"].astype(np.float32)
    assert logits.dtype == np.float32 and logits.shape == want.shape
    # float16 storage: compare with a tolerance relative to the value's magnitude
    np.testing.assert_allclose(logits, want, atol=2e-2, rtol=2e-3)
    assert mask_iou(logits > 0, want > 0) >= 0.999


def test_batched_boxes_predict_torch(encoded):
    predictor, spec, golden = encoded
    case = next(c for c in spec["cases"] if c["name"] == "batched_boxes")
    boxes = boxes_to_model_torch(torch.tensor(case["boxes"]), predictor.original_size)
    masks, iou, low_res = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    check_golden_outputs("batched_boxes", golden, masks.numpy(), iou.numpy(), low_res.numpy())


def test_predict_batch_matches_single_calls(encoded):
    predictor, spec, golden = encoded
    case = next(c for c in spec["cases"] if c["name"] == "batched_boxes")
    out = predictor.predict_batch(boxes=np.array(case["boxes"]))
    check_golden_outputs("batched_boxes", golden, out.masks, out.scores, out.low_res_logits)
    # ragged point lists: each object equals its own predict() call
    pts = [np.array([[100.0, 120.0]]), np.array([[300.0, 200.0], [50.0, 60.0]]), np.array([[10.0, 20.0]])]
    labels = [np.array([1]), np.array([1, 0]), np.array([1])]
    batch = predictor.predict_batch(point_coords=pts, point_labels=labels, multimask_output=True)
    for i in range(3):
        masks, iou, low_res = predictor.predict(pts[i], labels[i], multimask_output=True)
        np.testing.assert_allclose(batch.scores[i], iou, atol=1e-5)
        np.testing.assert_allclose(batch.low_res_logits[i], low_res, atol=1e-3)
        assert (batch.masks[i] == masks).mean() > 0.9999
