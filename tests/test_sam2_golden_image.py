"""Golden parity of the SAM 2 image predictor (../shared/golden/sam2, README "Image predictor cases")."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GOLDEN, IMAGES, _require, mask_iou, unpack_masks

pytestmark = pytest.mark.golden

SAM2 = GOLDEN / "sam2"


@pytest.fixture(scope="module")
def sam2_manifest():
    return json.loads((_require(SAM2) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def sam2_model():
    import anyseg

    return anyseg.load_model(_require(SAM2) / "sam2.1_golden.pt")


def _rgb(name):
    return np.array(Image.open(_require(IMAGES) / name).convert("RGB"))


def _close(got, want, atol, rtol=0.0, what=""):
    want = np.asarray(want, dtype=np.float32)
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    err = np.abs(got - want) - (atol + rtol * np.abs(want))
    assert err.max() <= 0, f"{what}: worst excess {err.max():.3g} (max abs diff {np.abs(got - want).max():.3g})"


def _check_masks(got, packed, shape, what):
    want = unpack_masks(packed, shape)
    got = np.asarray(got)
    assert got.shape == want.shape, f"{what}: mask shape {got.shape} vs {want.shape}"
    flat_got = got.reshape(-1, *got.shape[-2:]) > 0
    flat_want = want.reshape(-1, *want.shape[-2:])
    for i, (a, b) in enumerate(zip(flat_got, flat_want)):
        iou = mask_iou(a, b)
        assert iou >= 0.999, f"{what}: mask {i} IoU {iou:.5f}"


def _check_case(name, golden, masks, iou, low_res, tol):
    _check_masks(masks, golden[f"{name}_masks_packed"], golden[f"{name}_masks_shape"], name)
    _close(iou, golden[f"{name}_iou"], tol["iou_atol"], what=f"{name} iou")
    _close(low_res[..., ::4, ::4], golden[f"{name}_low_res_sampled"], tol["logits_atol"], tol["logits_rtol"],
           what=f"{name} low-res logits")


def _args(args, golden):
    out = {}
    for key, value in args.items():
        if key == "mask_input":
            out[key] = golden[value].astype(np.float32)
        elif isinstance(value, list):
            out[key] = np.array(value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("index", [0, 1], ids=["truck", "dog"])
def test_image_predictor_cases(index, sam2_manifest, sam2_model):
    from anyseg import SAM2ImagePredictor

    entry = sam2_manifest["image"][index]
    tol = sam2_manifest["tolerances"]["image"]
    golden = np.load(SAM2 / entry["file"])
    predictor = SAM2ImagePredictor(sam2_model)
    predictor.set_image(_rgb(entry["image"]))

    feats = {"image_embed": predictor.get_image_embedding(),
             "high_res_s0": predictor._features["high_res_feats"][0],
             "high_res_s1": predictor._features["high_res_feats"][1]}
    for key, tensor in feats.items():
        assert tuple(tensor.shape) == tuple(golden[f"{key}_shape"])
        idx = golden[f"sample_idx_{tensor.shape[-1]}"]
        sampled = tensor[..., idx, :][..., idx].numpy()
        _close(sampled, golden[f"{key}_sampled"], tol["features_atol"], what=key)

    for case in entry["cases"]:
        name = case["name"]
        masks, iou, low_res = predictor.predict(**_args(case["args"], golden))
        assert masks.dtype == np.float32 and iou.dtype == np.float32 and low_res.dtype == np.float32
        assert np.abs(low_res).max() <= 32.0
        _check_case(name, golden, masks, iou, low_res, tol)
        if name == "logits":
            _close(masks[..., ::16, ::16], golden["logits_logits_sampled"], tol["logits_atol"], tol["logits_rtol"],
                   what="return_logits logits")
        else:
            assert set(np.unique(masks)) <= {0.0, 1.0}


def test_predict_batch(sam2_manifest, sam2_model):
    from anyseg import SAM2ImagePredictor

    spec = sam2_manifest["predict_batch"]
    tol = sam2_manifest["tolerances"]["image"]
    golden = np.load(SAM2 / spec["file"])
    predictor = SAM2ImagePredictor(sam2_model)
    predictor.set_image_batch([_rgb(name) for name in spec["images"]])
    boxes = [None if b is None else np.array(b) for b in spec["box_batch"]]
    masks, ious, lows = predictor.predict_batch([np.array(c) for c in spec["point_coords_batch"]],
                                                [np.array(l) for l in spec["point_labels_batch"]],
                                                box_batch=boxes, multimask_output=spec["multimask_output"])
    assert len(masks) == len(ious) == len(lows) == len(spec["images"])
    for i in range(len(spec["images"])):
        _check_case(f"batch{i}", golden, masks[i], ious[i], lows[i], tol)


def test_predictor_errors(sam2_model):
    from anyseg import SAM2ImagePredictor
    from anyseg.prompts import ImageNotSetError

    predictor = SAM2ImagePredictor(sam2_model)
    with pytest.raises(ImageNotSetError):
        predictor.predict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([1]))
    predictor.set_image(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="together"):
        predictor.predict(point_coords=np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="mask_input"):
        predictor.predict(mask_input=np.zeros((1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="set_image_batch"):
        predictor.predict_batch([np.array([[1.0, 2.0]])], [np.array([1])])
    predictor.reset_predictor()
    assert not predictor.is_image_set
    with pytest.raises(TypeError, match="SAM 2 model"):
        SAM2ImagePredictor(torch.nn.Linear(2, 2))
