"""Output formats of segment everything: conversions, SA-1B / COCO JSON, label maps, polygons, YOLO."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from anyseg import formats
from anyseg.masks import coco_encode_rle, mask_to_rle


def make_masks(seed: int = 0, n: int = 5, h: int = 37, w: int = 53) -> np.ndarray:
    """``n`` masks: blobs with holes, a thin line, a border-touching block, one full-frame mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for i in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r_out, r_in = rng.uniform(6, 14), rng.uniform(1, 4)
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        m = (r2 < r_out**2) & ~(r2 < r_in**2)
        if i == 1:
            m = np.zeros((h, w), bool)
            m[int(cy), :] = True
        if i == 2:
            m = np.zeros((h, w), bool)
            m[: h // 3, w // 2 :] = True
        masks.append(m)
    masks[-1] = rng.random((h, w)) < 0.5
    return np.stack(masks)


def make_records(masks: np.ndarray, output_mode: str):
    """Records shaped like MaskGenerator's, built with anyseg.masks so the encodings are the generator's."""
    rles = mask_to_rle(torch.from_numpy(masks))
    records = []
    for i, (mask, rle) in enumerate(zip(masks, rles)):
        ys, xs = np.nonzero(mask) if mask.any() else (np.zeros(1, int), np.zeros(1, int))
        if output_mode == "coco_rle":
            seg = coco_encode_rle(rle)
        elif output_mode == "binary_mask":
            seg = mask.copy()
        else:
            seg = rle
        records.append({
            "segmentation": seg,
            "area": int(mask.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())],
            "predicted_iou": 0.9 - 0.01 * i + 1e-9 / 3,
            "point_coords": [[1.5 * i, 2.25]],
            "stability_score": 0.95 + 1e-7 * i,
            "crop_box": [0, 0, mask.shape[1], mask.shape[0]],
        })
    return records


def assert_records_equal(got, expected, output_mode="binary_mask", coco_bbox=False):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        mask = formats.to_binary_mask(g["segmentation"])
        np.testing.assert_array_equal(mask, formats.to_binary_mask(e["segmentation"]))
        assert formats._kind(g["segmentation"]) == output_mode
        for key in ("area", "predicted_iou", "point_coords", "stability_score", "crop_box"):
            assert g[key] == e[key], key
        if coco_bbox:  # COCO counts pixels: one more than the generator's last - first
            assert g["bbox"] == e["bbox"][:2] + [e["bbox"][2] + 1, e["bbox"][3] + 1]
        else:
            assert g["bbox"] == e["bbox"]


# ------------------------------------------------------------------------------------- conversions
EDGE_MASKS = {
    "empty": np.zeros((4, 5), bool),
    "full": np.ones((4, 5), bool),
    "first_pixel": np.eye(4, 5, dtype=bool),
    "last_pixel": np.zeros((4, 5), bool) | (np.arange(20).reshape(4, 5) == 19),
    "single_row": np.array([[True, False, True, True]]),
}


@pytest.mark.parametrize("name", sorted(EDGE_MASKS) + ["random0", "random1"])
def test_segmentation_forms_round_trip(name):
    mask = EDGE_MASKS[name] if name in EDGE_MASKS else make_masks(int(name[-1]))[-1]
    from pycocotools import mask as mask_utils

    coco = formats.to_coco_rle(mask)
    assert isinstance(coco["counts"], str) and coco["size"] == list(mask.shape)
    assert coco["counts"] == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    unc = formats.to_uncompressed_rle(mask)
    assert unc == mask_to_rle(torch.from_numpy(mask[None]))[0]  # same runs as the generator's
    for seg in (mask, coco, unc, formats.to_coco_rle(unc), formats.to_uncompressed_rle(coco)):
        np.testing.assert_array_equal(formats.to_binary_mask(seg), mask)
        assert formats.segmentation_size(seg) == mask.shape
    assert formats.to_coco_rle(unc) == coco
    assert formats.to_coco_rle({"size": coco["size"], "counts": coco["counts"].encode()}) == coco


def test_conversions_reject_bad_input():
    with pytest.raises(ValueError, match="segmentation"):
        formats.to_binary_mask([[1, 0]])
    with pytest.raises(ValueError, match="H x W"):
        formats.to_binary_mask(np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="sum to"):
        formats.to_binary_mask({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError, match="output_mode"):
        formats.convert_segmentation(np.zeros((2, 2), bool), "polygon")


# -------------------------------------------------------------------------------------------- SA-1B
@pytest.mark.parametrize("mode_in", formats.OUTPUT_MODES)
@pytest.mark.parametrize("mode_out", formats.OUTPUT_MODES)
def test_sa1b_round_trip(tmp_path, mode_in, mode_out):
    masks = make_masks(1)
    records = make_records(masks, mode_in)
    path = formats.write_sa1b_json(tmp_path / "a" / "img.json", records, file_name="img.jpg", image_id=7)
    data = json.loads(path.read_text())
    assert data["image"] == {"image_id": 7, "width": 53, "height": 37, "file_name": "img.jpg"}
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4, 5]
    assert all(isinstance(a["segmentation"]["counts"], str) for a in data["annotations"])
    image, back = formats.read_sa1b_json(path, output_mode=mode_out)
    assert image["file_name"] == "img.jpg"
    assert_records_equal(back, records, mode_out)
    assert list(tmp_path.joinpath("a").iterdir()) == [path]  # no temporary file left behind


def test_sa1b_size_checks_and_empty(tmp_path):
    records = make_records(make_masks(2), "coco_rle")
    with pytest.raises(ValueError, match="53 x 37"):
        formats.to_sa1b(records, file_name="x.jpg", width=50, height=37)
    with pytest.raises(ValueError, match="width and height"):
        formats.to_sa1b([], file_name="x.jpg")
    empty = formats.to_sa1b([], file_name="x.jpg", width=3, height=2)
    assert empty["annotations"] == [] and formats.read_sa1b_json(empty)[1] == []
    mixed = records + make_records(make_masks(2, h=10), "coco_rle")
    with pytest.raises(ValueError, match="different sizes"):
        formats.to_sa1b(mixed, file_name="x.jpg")
    bad = tmp_path / "bad.json"
    bad.write_text('{"image": {"width": 3')
    with pytest.raises(ValueError, match="not valid JSON"):
        formats.read_sa1b_json(bad)
    with pytest.raises(ValueError, match="not SA-1B"):
        formats.read_sa1b_json({"images": []})


def test_missing_area_and_bbox_are_computed():
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:7] = True
    (ann,) = formats.to_sa1b([{"segmentation": mask}], file_name="m.png")["annotations"]
    # The generator's convention (reference SAM): width = last column - first column.
    assert ann["area"] == 10 and ann["bbox"] == [2, 1, 4, 1]
    assert "predicted_iou" not in ann


# --------------------------------------------------------------------------------------------- COCO
@pytest.mark.parametrize("segmentation", ["rle", "polygon"])
def test_coco_builder_round_trip(tmp_path, segmentation):
    from pycocotools.coco import COCO

    masks_a, masks_b = make_masks(3), make_masks(4, n=3, h=20, w=30)
    builder = formats.CocoBuilder(segmentation=segmentation)
    assert builder.add_image(make_records(masks_a, "binary_mask"), file_name="a.jpg") == 1
    assert builder.add_image(make_records(masks_b, "uncompressed_rle"), file_name="sub/b.jpg") == 2
    assert builder.add_image([], file_name="c.jpg", width=4, height=3) == 3
    path = builder.write(tmp_path / "coco.json")
    data = json.loads(path.read_text())
    assert [im["id"] for im in data["images"]] == [1, 2, 3]
    assert [a["id"] for a in data["annotations"]] == list(range(1, 9))
    assert data["categories"] == [formats.DEFAULT_CATEGORY]
    kind = list if segmentation == "polygon" else dict
    assert all(isinstance(a["segmentation"], kind) for a in data["annotations"])

    read = formats.read_coco_json(path)
    assert [im["file_name"] for im, _ in read] == ["a.jpg", "sub/b.jpg", "c.jpg"]
    assert_records_equal(read[0][1], make_records(masks_a, "binary_mask"), coco_bbox=True)
    assert_records_equal(read[1][1], make_records(masks_b, "binary_mask"), coco_bbox=True)
    assert read[2][1] == []
    # The official COCO API reads it and decodes the same masks.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        coco = COCO(str(path))
        for ann_id, mask in zip(coco.getAnnIds(imgIds=[1]), masks_a):
            np.testing.assert_array_equal(coco.annToMask(coco.loadAnns(ann_id)[0]).astype(bool), mask)


def test_coco_builder_replace_and_continue(tmp_path):
    masks = make_masks(5, n=3)
    builder = formats.CocoBuilder()
    builder.add_image(make_records(masks, "coco_rle"), file_name="a.jpg")
    builder.add_image(make_records(masks[:1], "coco_rle"), file_name="b.jpg")
    # Redoing a.jpg keeps its id and replaces its annotations; ids stay unique.
    assert builder.add_image(make_records(masks[:2], "coco_rle"), file_name="a.jpg") == 1
    data = builder.to_dict()
    assert [(a["image_id"], a["id"]) for a in data["annotations"]] == [(1, 5), (1, 6), (2, 4)]
    path = builder.write(tmp_path / "c.json")
    again = formats.CocoBuilder.load(path)
    assert again.add_image(make_records(masks, "coco_rle"), file_name="c.jpg") == 3
    ids = [a["id"] for a in again.to_dict()["annotations"]]
    assert len(ids) == len(set(ids)) == 6 and max(ids) == 9
    with pytest.raises(ValueError, match="already used"):
        again.add_image([], file_name="d.jpg", width=2, height=2, image_id=1)
    with pytest.raises(ValueError, match="'rle' or 'polygon'"):
        formats.CocoBuilder(segmentation="mask")
    with pytest.raises(ValueError, match="not COCO"):
        formats.read_coco_json({"image": {}})


# ----------------------------------------------------------------------------------------- label map
def test_label_map_paints_small_masks_on_top():
    big = np.zeros((10, 12), bool)
    big[1:9, 1:11] = True
    small = np.zeros_like(big)
    small[4:6, 4:6] = True
    mid = np.zeros_like(big)
    mid[3:8, 3:8] = True
    labels = formats.label_map([small, big, mid])  # ids follow the input order: small=1, big=2, mid=3
    assert labels.dtype == np.uint8
    assert labels[4, 4] == 1 and labels[3, 3] == 3 and labels[1, 1] == 2 and labels[0, 0] == 0
    assert (labels == 1).sum() == 4 and (labels == 3).sum() == 25 - 4
    visible = formats.label_map_to_masks(labels)
    assert visible.shape == (3, 10, 12)
    np.testing.assert_array_equal(visible[0], small)
    # Records in any form give the same map.
    recs = make_records(np.stack([small, big, mid]), "coco_rle")
    np.testing.assert_array_equal(formats.label_map(recs), labels)


def test_label_map_png_round_trip_8_and_16_bit(tmp_path):
    masks = make_masks(6)
    labels = formats.label_map(make_records(masks, "uncompressed_rle"))
    path = formats.write_label_png(tmp_path / "l8.png", make_records(masks, "coco_rle"))
    np.testing.assert_array_equal(formats.read_label_png(path), labels)
    many = np.zeros((300, 17, 19), bool)
    for i in range(300):
        many[i].flat[i] = True  # 300 single pixels, all visible
    labels16 = formats.label_map(many)
    assert labels16.dtype == np.uint16 and labels16.max() == 300
    back = formats.read_label_png(formats.write_label_png(tmp_path / "l16.png", many))
    np.testing.assert_array_equal(back, labels16)
    np.testing.assert_array_equal(formats.label_map_to_masks(back), many)
    assert formats.label_map([], shape=(3, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match="shape"):
        formats.label_map([])
    with pytest.raises(ValueError, match="do not fit"):
        formats.label_map(many, dtype=np.uint8)


# ------------------------------------------------------------------------------------------ polygons
def test_polygons_json_round_trip(tmp_path):
    masks = make_masks(7)
    records = make_records(masks, "coco_rle")
    path = formats.write_polygons_json(tmp_path / "p.json", records, file_name="p.jpg")
    data = json.loads(path.read_text())
    holed = [a for a in data["annotations"] if any(p["holes"] for p in a["polygons"])]
    assert holed, "the ring-shaped masks should keep their holes"
    image, back = formats.read_polygons_json(path, output_mode="coco_rle")
    assert (image["width"], image["height"]) == (53, 37)
    assert_records_equal(back, records, "coco_rle")


def test_simplified_polygons_keep_iou():
    yy, xx = np.mgrid[:120, :150]
    r2 = (yy - 60) ** 2 + (xx - 70) ** 2
    masks = ((r2 < 50**2) & ~(r2 < 20**2))[None]
    data = formats.to_polygons_json(make_records(masks, "binary_mask"), file_name="x", tolerance=1.0)
    _, back = formats.read_polygons_json(data)
    got = back[0]["segmentation"]
    assert (got & masks[0]).sum() / (got | masks[0]).sum() >= 0.98


def test_yolo_round_trip(tmp_path):
    masks = make_masks(9)
    masks[0] = False  # an empty mask has no line
    path = formats.write_yolo_seg(tmp_path / "y.txt", make_records(masks, "binary_mask"), class_id=2)
    lines = path.read_text().splitlines()
    assert len(lines) == len(masks) - 1 and all(line.startswith("2 ") for line in lines)
    back = formats.read_yolo_seg(path, width=53, height=37)
    for (cls, mask), expected in zip(back, masks[1:]):
        assert cls == 2
        np.testing.assert_array_equal(mask, expected)
    assert formats.read_yolo_seg("", 5, 5) == []
    with pytest.raises(ValueError, match="YOLO line 1"):
        formats.read_yolo_seg("0 0.1 0.2\n", 5, 5)


def test_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, anyseg.formats; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
