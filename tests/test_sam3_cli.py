"""``anyseg segment IMAGE --text ...`` with a SAM 3 model, end to end on the golden checkpoint: the
instances written (mask PNGs, JSON, overlay) are the golden detections of the same prompt."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import GOLDEN, IMAGES, _require, mask_iou, unpack_masks

pytestmark = [pytest.mark.golden, pytest.mark.slow]

SAM3 = GOLDEN / "sam3"


def _segment(tmp_path, *extra):
    from anyseg.cli import main

    out = tmp_path / "out"
    code = main(["segment", str(_require(IMAGES) / "truck.jpg"), "--model", str(_require(SAM3) / "sam3_checkpoint.pt"),
                 "--device", "cpu", "--speed", "faithful", "-o", str(out), *extra])
    assert code == 0
    return out, json.loads((out / "truck.json").read_text())


def _check_against_golden(out, record, case):
    golden = np.load(_require(SAM3) / "sam3_truck.npz")
    want_masks = unpack_masks(golden[f"{case}_masks_packed"], golden[f"{case}_masks_shape"])[:, 0]
    instances = record["instances"]
    assert len(instances) == len(golden[f"{case}_scores"]) > 0
    np.testing.assert_allclose([i["score"] for i in instances], golden[f"{case}_scores"], atol=2e-3)
    np.testing.assert_allclose([i["bbox_xyxy"] for i in instances], golden[f"{case}_boxes"], atol=1.0)
    for inst, want in zip(instances, want_masks):
        got = np.array(Image.open(out / inst["file"])) > 0
        assert got.shape == want.shape and mask_iou(got, want) >= 0.999
        assert inst["area"] == int(got.sum())
    overlay = np.array(Image.open(out / record["overlay"]))
    assert overlay.shape == (1200, 1800, 3)
    image = np.array(Image.open(_require(IMAGES) / "truck.jpg").convert("RGB"))
    assert (overlay != image).any(axis=-1)[want_masks[0]].mean() > 0.5  # the instances are drawn


def test_segment_text_finds_every_instance(tmp_path):
    out, record = _segment(tmp_path, "--text", "green vegetables. red apple")
    assert record["family"] == "sam3" and record["prompt"]["phrases"] == ["green vegetables", "red apple"]
    assert {i["label"] for i in record["instances"]} == {"green vegetables"}  # phrase B is absent
    _check_against_golden(out, record, "text_a")


def test_segment_box_exemplar_alone(tmp_path):
    # The golden box_only case's normalised box [0.55, 0.5, 0.45, 0.5] in truck.jpg's pixels (1800 x 1200).
    out, record = _segment(tmp_path, "--box-exemplar", "585,300,1395,900")
    assert record["prompt"]["exemplars"] == [{"bbox_xyxy": [585.0, 300.0, 1395.0, 900.0], "label": 1}]
    _check_against_golden(out, record, "box_only")


def test_point_prompts_are_refused_for_sam3(tmp_path, capsys):
    from anyseg.cli import main

    code = main(["segment", str(_require(IMAGES) / "truck.jpg"), "--model", str(_require(SAM3) / "sam3_checkpoint.pt"),
                 "--text", "dog", "--point", "10,10", "-o", str(tmp_path / "out")])
    assert code != 0
    assert "concept prompts" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
