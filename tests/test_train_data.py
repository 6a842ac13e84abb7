"""Training datasets: COCO (polygons, RLE), SA-1B, label-map folders, synthetic scenes, model frame."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anyseg.masks import coco_encode_rle, mask_to_rle
from anyseg.train.datasets import (CocoInstances, LabelMapFolder, SA1BFolder, mask_boxes, open_dataset,
                                   to_model_frame)
from anyseg.train.synthetic import SyntheticDataset


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _coco_rle(mask):
    import torch

    return coco_encode_rle(mask_to_rle(torch.from_numpy(mask[None]))[0])


@pytest.fixture()
def coco_dir(tmp_path):
    h, w = 40, 60
    img = np.random.default_rng(0).integers(0, 255, (h, w), dtype=np.uint8)  # grayscale file
    (tmp_path / "images").mkdir()
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    img16 = (np.arange(h * w).reshape(h, w) * 20).astype(np.uint16)  # 16-bit file
    Image.fromarray(img16).save(tmp_path / "images" / "b.png")
    square = _rect(h, w, 10, 20, 5, 25)
    unc = mask_to_rle(__import__("torch").from_numpy(_rect(h, w, 0, 5, 0, 60)[None]))[0]
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w},
                   {"id": 2, "file_name": "b.png", "height": h, "width": w},
                   {"id": 3, "file_name": "none.png", "height": h, "width": w}],
        "annotations": [
            # polygon covering pixels x 5..24, y 10..19 (pixel-corner coordinates)
            {"id": 1, "image_id": 1, "segmentation": [[5, 10, 25, 10, 25, 20, 5, 20]], "iscrowd": 0},
            {"id": 2, "image_id": 1, "segmentation": _coco_rle(_rect(h, w, 30, 40, 40, 60)), "iscrowd": 0},
            {"id": 3, "image_id": 2, "segmentation": {"size": unc["size"], "counts": unc["counts"]}, "iscrowd": 0},
            {"id": 4, "image_id": 2, "segmentation": _coco_rle(_rect(h, w, 0, 40, 0, 60)), "iscrowd": 1},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path, square


def test_coco_polygons_and_rle(coco_dir):
    root, square = coco_dir
    ds = open_dataset(root / "ann.json")
    assert isinstance(ds, CocoInstances) and len(ds) == 2  # image 3 has no annotation
    a = ds[0]
    assert a.image.shape == (40, 60, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image[..., 0], a.image[..., 2])  # grayscale replicated
    assert a.masks.shape == (2, 40, 60)
    assert abs(int(a.masks[0].sum()) - int(square.sum())) <= 25  # polygon rasterisation at the edges
    assert (a.masks[0] & square).sum() >= 0.9 * square.sum()
    assert np.array_equal(a.masks[1], _rect(40, 60, 30, 40, 40, 60))
    b = ds[1]
    assert b.masks.shape == (1, 40, 60)  # crowd annotation skipped
    assert np.array_equal(b.masks[0], _rect(40, 60, 0, 5, 0, 60))
    assert b.image.dtype == np.uint8 and b.image.max() > 0
    crowd = CocoInstances(root / "ann.json", include_crowd=True)
    assert crowd[1].masks.shape[0] == 2


def test_coco_errors_are_clear(tmp_path):
    (tmp_path / "x.json").write_text("{\"foo\": 1}")
    with pytest.raises(ValueError, match="COCO instances"):
        open_dataset(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="synthetic dataset options"):
        open_dataset("synthetic:count")


def test_sa1b_folder(tmp_path):
    h, w = 30, 50
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / "sa_1.jpg")
    m1, m2 = _rect(h, w, 0, 10, 0, 10), _rect(h, w, 5, 30, 20, 50)
    ann = {"image": {"image_id": 1, "file_name": "sa_1.jpg", "height": h, "width": w},
           "annotations": [{"id": 1, "segmentation": _coco_rle(m1)}, {"id": 2, "segmentation": _coco_rle(m2)}]}
    (tmp_path / "sa_1.json").write_text(json.dumps(ann))
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "sa_2.jpg")  # no annotation: skipped
    ds = open_dataset(tmp_path)
    assert isinstance(ds, SA1BFolder) and len(ds) == 1
    s = ds[0]
    assert np.array_equal(s.masks, np.stack([m1, m2]))


@pytest.mark.parametrize("kind", ["uint8", "uint16", "rgb"])
def test_label_map_folder(tmp_path, kind):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    h, w = 24, 32
    labels = np.zeros((h, w), np.int64)
    labels[2:10, 3:12] = 7
    labels[12:20, 15:30] = 300 if kind != "uint8" else 200
    if kind == "uint16":
        Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "labels" / "x.png")
    elif kind == "rgb":
        rgb = np.stack([(labels >> 16) & 255, (labels >> 8) & 255, labels & 255], -1).astype(np.uint8)
        Image.fromarray(rgb).save(tmp_path / "labels" / "x.png")
    else:
        Image.fromarray(labels.astype(np.uint8)).save(tmp_path / "labels" / "x.png")
    Image.fromarray(np.full((h, w, 3), 50, np.uint8)).save(tmp_path / "images" / "x.jpg")
    ds = open_dataset(tmp_path)
    assert isinstance(ds, LabelMapFolder) and len(ds) == 1
    s = ds[0]
    assert s.masks.shape == (2, h, w)
    assert np.array_equal(s.masks[0], labels == 7)
    assert np.array_equal(s.masks[1], labels == labels.max())


def test_label_map_size_mismatch(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "labels" / "x.png")
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "images" / "x.png")
    with pytest.raises(ValueError, match="label map is 10x10"):
        LabelMapFolder(tmp_path)[0]


def test_synthetic_scenes_are_seeded_exact_and_have_parts():
    ds = SyntheticDataset(count=8, seed=5, size=96)
    again = SyntheticDataset(count=8, seed=5, size=96)
    other = SyntheticDataset(count=8, seed=6, size=96)
    assert ds.key != other.key
    n_parts = 0
    for i in range(8):
        s = ds[i]
        assert np.array_equal(s.image, again[i].image) and np.array_equal(s.masks, again[i].masks)
        assert max(s.image.shape[:2]) == 96 and s.masks.shape[1:] == s.image.shape[:2]
        assert len(s.kinds) == len(s.masks) == len(s.parents)
        objects = [m for m, k in zip(s.masks, s.kinds) if k == "object"]
        # visible object regions never overlap (occlusion is resolved exactly)
        assert (np.sum(objects, axis=0) <= 1).all()
        for m, k, parent in zip(s.masks, s.kinds, s.parents):
            assert m.sum() >= ds.min_area
            if k == "part":
                n_parts += 1
                assert not (m & ~s.masks[parent]).any()  # a part lies inside its object
                assert m.sum() < s.masks[parent].sum()
    assert n_parts > 0
    assert not np.array_equal(ds[0].image, other[0].image)
    with pytest.raises(IndexError):
        ds[8]


def test_to_model_frame_resizes_and_pads():
    ds = SyntheticDataset(count=1, seed=0, size=100)
    s = ds[0]
    frame = to_model_frame(s, 64)
    h, w = s.image.shape[:2]
    assert frame.original_size == (h, w)
    assert max(frame.input_size) == 64
    assert frame.image.shape == (3, *frame.input_size)
    assert frame.masks.shape == (len(s.masks), 64, 64)
    assert not frame.masks[:, frame.input_size[0]:, :].any() and not frame.masks[:, :, frame.input_size[1]:].any()
    flipped = to_model_frame(s, 64, flip=True)
    assert np.array_equal(flipped.masks[:, :, : frame.input_size[1]].numpy(),
                          frame.masks[:, :, : frame.input_size[1]].numpy()[:, :, ::-1])
    boxes = mask_boxes(s.masks)
    for b, m in zip(boxes, s.masks):
        ys, xs = np.nonzero(m)
        assert tuple(b) == (xs.min(), ys.min(), xs.max(), ys.max())
