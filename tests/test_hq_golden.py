"""Golden parity of HQ-SAM (golden/hq/README.md): every predictor case of both golden HQ models on both
images, the encoder hand-over (intermediate feature, HQ feature) and the segment-everything cases.

The HQ checkpoints are composed in a temporary folder from the SAM 1 golden checkpoint and the HQ keys.
"""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from anyseg import MaskGenerator, SamPredictor, load_model
from anyseg.imageio import load_image
from anyseg.masks import coco_rle_to_mask

from conftest import mask_iou, unpack_masks

pytestmark = pytest.mark.golden

MODELS = ("vit_small", "mobilesam")


@pytest.fixture(scope="module")
def hq_dir(golden_dir):
    from conftest import _require

    return _require(golden_dir / "hq")


@pytest.fixture(scope="module")
def hq_manifest(hq_dir):
    return json.loads((hq_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def hq_models(hq_dir, hq_manifest, tmp_path_factory):
    """Full HQ checkpoints composed as the README says, loaded through ``load_model``."""
    folder = tmp_path_factory.mktemp("hq")
    models = {}
    for name in MODELS:
        entry = hq_manifest[name]
        sd = torch.load(hq_dir / entry["base_checkpoint"], weights_only=True)
        extra = torch.load(hq_dir / entry["extra_checkpoint"], weights_only=True)
        assert not set(sd) & set(extra)
        sd.update(extra)
        path = folder / f"sam_hq_{name}.pth"
        torch.save(sd, path)
        models[name] = load_model(path)
    return models


@pytest.fixture(scope="module", params=[(m, i) for m in MODELS for i in ("truck.jpg", "dog.jpg")],
                ids=lambda p: f"{p[0]}-{p[1].split('.')[0]}")
def encoded(request, hq_models, hq_manifest, hq_dir, images_dir):
    name, image = request.param
    entry = next(e for e in hq_manifest[name]["predictor"] if e["image"] == image)
    predictor = SamPredictor(hq_models[name])
    predictor.set_image(images_dir / image)
    return name, predictor, entry, np.load(hq_dir / entry["file"])


def _check(name, golden, masks, iou, low_res):
    want_masks = unpack_masks(golden[f"{name}_masks_packed"], golden[f"{name}_masks_shape"])
    assert masks.shape == want_masks.shape, name
    ref = golden[f"{name}_low_res_logits"].astype(np.float32)
    assert low_res.shape == ref.shape, name
    err = np.abs(low_res - ref) - (1e-2 + 2e-3 * np.abs(ref))
    assert err.max() <= 0, f"{name}: low-res logits off by {np.abs(low_res - ref).max():.3g}"
    assert np.abs(iou - golden[f"{name}_iou"]).max() <= 1e-3, name
    flat_ours = masks.reshape(-1, *masks.shape[-2:])
    flat_ref = want_masks.reshape(-1, *want_masks.shape[-2:])
    for a, b in zip(flat_ours, flat_ref):
        assert mask_iou(a, b) >= 0.999, name


def test_encoder_hand_over(encoded, golden_dir):
    name, predictor, entry, golden = encoded
    emb = np.load(golden_dir / entry["image_embedding_file"].replace("../", ""))["image_embedding"]
    assert np.abs(predictor.get_image_embedding().numpy() - emb).max() <= 1e-3
    assert predictor.interm_features.shape[:3] == (1, 64, 64)
    if "interm_embedding_corner" not in golden.files:
        return
    ref = golden["interm_embedding_corner"].astype(np.float32)
    interm = predictor.interm_features[:, :32, :32].numpy()
    assert (np.abs(interm - ref) - (1e-2 + 2e-3 * np.abs(ref))).max() <= 0
    with torch.inference_mode():
        hq = predictor.hq_features()
    assert hq.shape == (1, 32, 256, 256)
    assert np.abs(hq[:, :, :32, :32].numpy() - golden["hq_features_corner"].reshape(1, 32, 32, 32)).max() <= 1e-3


def test_predictor_cases(encoded):
    name, predictor, entry, golden = encoded
    for case in entry["cases"]:
        if case["call"] != "predict":
            continue
        kwargs = {}
        if case.get("point_coords") is not None:
            kwargs["point_coords"] = np.array(case["point_coords"], dtype=np.float32)
            kwargs["point_labels"] = np.array(case["point_labels"])
        if case.get("box") is not None:
            kwargs["box"] = np.array(case["box"], dtype=np.float32)
        if "mask_input" in case:
            kwargs["mask_input"] = golden["refine_mask_input"].astype(np.float32)
        if case["name"] != "default_args":  # that case pins the defaults
            kwargs["multimask_output"] = case["multimask_output"]
            kwargs["hq_token_only"] = case["hq_token_only"]
        masks, iou, low_res = predictor.predict(**kwargs)
        assert masks.shape[0] == iou.shape[0] == low_res.shape[0] == 1  # one mask per prompt, always
        _check(case["name"], golden, masks, iou, low_res)


def test_batched_cases(encoded):
    name, predictor, entry, golden = encoded
    for case in entry["cases"]:
        if case["call"] != "predict_torch":
            continue
        boxes = np.array(case["boxes"], dtype=np.float32)
        out = predictor.predict_batch(boxes=boxes, multimask_output=case["multimask_output"],
                                      hq_token_only=case["hq_token_only"])
        _check(case["name"], golden, out.masks, out.scores, out.low_res_logits)
        model_boxes = predictor.transform_boxes_torch(torch.as_tensor(boxes, dtype=torch.float64)).float()
        masks, iou, low_res = predictor.predict_torch(None, None, boxes=model_boxes,
                                                      multimask_output=case["multimask_output"],
                                                      hq_token_only=case["hq_token_only"])
        assert masks.shape[:2] == iou.shape == low_res.shape[:2] == (len(boxes), 1)
        _check(case["name"], golden, masks.numpy(), iou.numpy(), low_res.numpy())


def test_hq_token_only_needs_an_hq_model(golden_dir):
    model = load_model(golden_dir / "vit_small_checkpoint.pth")
    predictor = SamPredictor(model)
    predictor.set_embedding(torch.zeros(1, 256, 64, 64), (768, 1024), (768, 1024))
    with pytest.raises(ValueError, match="HQ-SAM"):
        predictor.predict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1]), hq_token_only=True)


@pytest.mark.parametrize("name,case", [(m, i) for m in MODELS for i in range(2)],
                         ids=[f"{m}-{i}" for m in MODELS for i in range(2)])
def test_amg_matches_reference(name, case, hq_models, hq_dir, images_dir):
    with gzip.open(hq_dir / f"{name}_hq_amg_{case}.json.gz", "rt") as f:
        golden = json.load(f)
    image = load_image(images_dir / golden["image"]) if "image" in golden else load_image(images_dir / "groceries.jpg")
    kwargs = {} if golden.get("hq_token_only") is None else {"hq_token_only": golden["hq_token_only"]}
    generator = MaskGenerator(hq_models[name], output_mode=golden["output_mode"], **golden["params"], **kwargs)
    records = generator.generate(image)
    refs = golden["masks"]
    assert len(records) == len(refs)
    by_point = {tuple(map(tuple, r["point_coords"])): r for r in records}
    assert len(by_point) == len(records)
    for i, ref in enumerate(refs):
        ours = by_point[tuple(map(tuple, ref["point_coords"]))]
        j = records.index(ours)
        if j != i:  # only records whose scores are within 1e-3 may swap places
            assert abs(records[i]["predicted_iou"] - ref["predicted_iou"]) <= 1e-3, f"record {i}"
        iou = mask_iou(coco_rle_to_mask(ours["segmentation"]), coco_rle_to_mask(ref["segmentation"]))
        assert iou >= 0.99, f"record {i}: mask IoU {iou:.4f}"
        assert abs(ours["predicted_iou"] - ref["predicted_iou"]) <= 1e-3, f"record {i}"
        assert abs(ours["stability_score"] - ref["stability_score"]) <= 1e-3, f"record {i}"
        assert np.max(np.abs(np.subtract(ours["bbox"], ref["bbox"]))) <= 2, f"record {i}"
        assert ours["crop_box"] == ref["crop_box"], f"record {i}"
