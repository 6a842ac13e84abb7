"""Names for code written against ``segment_anything`` (and MobileSAM's package).

- the builders (``sam_model_registry``, ``build_sam*``) and the model attributes that user code reads;
- the adapters of ``anyseg.utils``: ``ResizeLongestSide`` against ``anyseg.geometry`` (property tests)
  and ``anyseg.utils.amg`` against ``anyseg.masks``;
- the package-level names (``anyseg.sam_model_registry``, ...), skipped until the export table lists
  them.

The programs written in the style of the reference's own usage are in this folder's other modules.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anyseg
from anyseg import masks as M
from anyseg.checkpoint import CheckpointError, load_model
from anyseg.config import VARIANTS, SamConfig
from anyseg.geometry import (
    boxes_to_model,
    boxes_to_model_torch,
    coords_from_model,
    coords_to_model,
    coords_to_model_torch,
    resized_shape,
)
from anyseg.modeling.sam import Sam
from anyseg.modeling.sam import build_sam as build_from_config
from compat_helpers import GOLDEN_IDS, GOLDEN_MODELS, PARAMS, golden_models  # noqa: F401 (fixture)

# The imports user code makes, with ``segment_anything`` replaced by ``anyseg`` (registry and builders
# from the module that defines them; the package-level names are tested at the end).
from anyseg import SamPredictor
from anyseg.dropin import (
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    build_sam_vit_t,
    sam_model_registry,
)
from anyseg.utils import amg as reference_amg
from anyseg.utils.transforms import ResizeLongestSide


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def test_registry_keys_and_builders():
    assert set(sam_model_registry) == {"default", "vit_h", "vit_l", "vit_b", "vit_t", "vit_tiny"}  # + Light HQ-SAM
    assert sam_model_registry["default"] is build_sam_vit_h
    builders = {"vit_h": build_sam_vit_h, "vit_l": build_sam_vit_l, "vit_b": build_sam_vit_b, "vit_t": build_sam_vit_t}
    for key, builder in builders.items():
        assert sam_model_registry[key] is builder


@pytest.mark.parametrize("key", ["default", "vit_h", "vit_l", "vit_b"])
def test_registry_builds_each_vit_architecture(key):
    # Built on the meta device: the architecture without 2.5 GB of random weights.
    with torch.device("meta"):
        model = sam_model_registry[key]()
    variant = "vit_h" if key == "default" else key
    assert isinstance(model, Sam) and not model.training
    assert model.config == VARIANTS[variant]
    assert sum(p.numel() for p in model.parameters()) == PARAMS[variant]


def test_registry_builds_tiny_vit_with_random_weights():
    torch.manual_seed(0)
    a = sam_model_registry["vit_t"]()
    b = build_sam_vit_t(checkpoint=None)
    assert isinstance(a, Sam) and not a.training and a.config == VARIANTS["vit_t"]
    assert 9_000_000 < sum(p.numel() for p in a.parameters()) < 11_000_000
    # random initialisation: two builds differ, and the weights are not all zero
    w_a, w_b = a.image_encoder.state_dict(), b.image_encoder.state_dict()
    assert any(not torch.equal(w_a[k], w_b[k]) for k in w_a if w_a[k].is_floating_point())


@pytest.mark.parametrize("key,name", GOLDEN_MODELS, ids=GOLDEN_IDS)
def test_registry_loads_a_checkpoint_through_load_model(key, name, golden_dir):
    path = golden_dir / name
    if key == "vit_t":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the exact architecture: no warning
            model = sam_model_registry[key](checkpoint=str(path))
    else:
        with pytest.warns(UserWarning, match=r"holds a ViT \(embed_dim 96, depth 4.*not vit_b"):
            model = sam_model_registry[key](checkpoint=path)
    want = load_model(path)
    assert isinstance(model, Sam) and not model.training and model.config == want.config
    got_sd, want_sd = model.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys()
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in got_sd)


def _truncated(golden_dir, tmp_path) -> Path:
    sd = torch.load(golden_dir / "mobilesam_checkpoint.pth", weights_only=True)
    for k in [k for k in sd if k.startswith("mask_decoder.output_hypernetworks_mlps.1.")]:
        del sd[k]
    sd["mask_decoder.iou_token.extra"] = torch.zeros(3)
    path = tmp_path / "truncated.pth"
    torch.save(sd, path)
    return path


def _foreign(tmp_path) -> Path:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, path)
    return path


@pytest.mark.parametrize("make", ["truncated", "foreign", "missing"])
def test_registry_wrong_checkpoint_gives_load_models_error(make, golden_dir, tmp_path):
    path = {"truncated": lambda: _truncated(golden_dir, tmp_path), "foreign": lambda: _foreign(tmp_path),
            "missing": lambda: tmp_path / "nowhere.pth"}[make]()
    with pytest.raises(Exception) as direct:
        load_model(path)
    for builder in (sam_model_registry["vit_t"], sam_model_registry["default"], build_sam):
        with pytest.raises(type(direct.value)) as via_registry:
            builder(checkpoint=path)
        assert str(via_registry.value) == str(direct.value)
    if make != "missing":
        assert isinstance(direct.value, CheckpointError)
    if make == "truncated":
        message = str(direct.value)
        assert "missing keys (6)" in message and "mask_decoder.output_hypernetworks_mlps.1.layers" in message
        assert "unexpected keys (1)" in message and "mask_decoder.iou_token.extra" in message


def test_registry_rejects_a_sam2_checkpoint(golden_dir):
    path = golden_dir / "sam2" / "sam2.1_golden.pt"
    if not path.exists():
        pytest.skip(f"no SAM 2 golden checkpoint at {path}")
    with pytest.raises(CheckpointError, match="not a SAM 1 checkpoint.*build_sam2"):
        sam_model_registry["vit_b"](checkpoint=path)


def test_build_sam_takes_a_config_or_a_checkpoint(golden_dir):
    config = SamConfig(encoder=VARIANTS["vit_t"].encoder)
    # the existing form: an untrained model of a config, in training mode, as modeling.sam.build_sam
    model = build_sam(config)
    assert isinstance(model, Sam) and model.training and model.config == config
    assert model.state_dict().keys() == build_from_config(config).state_dict().keys()
    # a config and a checkpoint: the file loaded into that architecture
    path = golden_dir / "mobilesam_checkpoint.pth"
    loaded = build_sam(config, checkpoint=path)
    assert torch.equal(loaded.mask_decoder.iou_token.weight, load_model(path).mask_decoder.iou_token.weight)
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        build_sam(VARIANTS["vit_b"], checkpoint=golden_dir / "vit_small_checkpoint.pth")
    # the reference forms: build_sam is build_sam_vit_h
    with pytest.warns(UserWarning, match=r"sam_model_registry\['vit_h'\].*not vit_h"):
        by_keyword = build_sam(checkpoint=path)
    with pytest.warns(UserWarning, match="not vit_h"):
        positional = build_sam(str(path))
    assert by_keyword.config == positional.config == VARIANTS["vit_t"]
    with torch.device("meta"):
        assert build_sam().config == VARIANTS["vit_h"]
    with pytest.raises(TypeError, match="SamConfig or a checkpoint path"):
        build_sam(42)
    with pytest.raises(TypeError, match="two checkpoints"):
        build_sam(str(path), checkpoint=path)


# --------------------------------------------------------------------------------------------------
# ResizeLongestSide against anyseg.geometry
# --------------------------------------------------------------------------------------------------

def _random_sizes(rng, n):
    """``(h, w, target)`` triples: random sizes from 1 to 5000 px, extreme aspects, and exact fits; only
    sizes whose short side stays at least one pixel (as any real image)."""
    fixed = [(1024, 1024, 1024), (1, 1, 1024), (1200, 1800, 1024), (534, 800, 1024), (5000, 3, 1024),
             (7, 4999, 512), (100, 100, 37)]
    out = [c for c in fixed if min(resized_shape(*c)) >= 1]
    while len(out) < n:
        h, w = (int(v) for v in rng.integers(1, 5001, size=2))
        target = int(rng.choice([1024, 512, 256, 1000, 37]))
        if min(resized_shape(h, w, target)) >= 1:
            out.append((h, w, target))
    return out


def test_resize_longest_side_is_geometry():
    rng = np.random.default_rng(0)
    for h, w, target in _random_sizes(rng, 200):
        t = ResizeLongestSide(target)
        shape = t.get_preprocess_shape(h, w, target)
        assert shape == resized_shape(h, w, target) and max(shape) == target
        coords = rng.uniform(0, [w, h], size=(3, 5, 2))
        x0y0 = rng.uniform(0, [w, h], size=(6, 2))
        boxes = np.concatenate([x0y0, x0y0 + rng.uniform(0, [w, h], size=(6, 2))], axis=1)
        # numpy: the geometry functions themselves (boxes as B x 4, as the reference returns them)
        np.testing.assert_array_equal(t.apply_coords(coords, (h, w)), coords_to_model(coords, (h, w), target))
        np.testing.assert_array_equal(t.apply_boxes(boxes, (h, w)), boxes_to_model(boxes, (h, w), target))
        assert t.apply_boxes(boxes[0], (h, w)).shape == (1, 4)
        # torch: the geometry functions, the same values as the numpy path
        ct = t.apply_coords_torch(torch.from_numpy(coords), (h, w))
        bt = t.apply_boxes_torch(torch.from_numpy(boxes).float(), torch.Size([h, w]))
        assert ct.dtype == bt.dtype == torch.float32 and bt.shape == (6, 4)
        assert torch.equal(ct, coords_to_model_torch(torch.from_numpy(coords), (h, w), target))
        assert torch.equal(bt, boxes_to_model_torch(torch.from_numpy(boxes).float(), (h, w), target))
        np.testing.assert_array_equal(ct.numpy(), t.apply_coords(coords, (h, w)))
        # properties: boxes stay ordered, the far corner maps to the resized size, points round-trip
        out = t.apply_boxes(boxes, (h, w))
        assert (out[:, 2] >= out[:, 0]).all() and (out[:, 3] >= out[:, 1]).all()
        corner = t.apply_coords(np.array([[w, h]], dtype=np.float64), (h, w))[0]
        np.testing.assert_allclose(corner, [shape[1], shape[0]], rtol=1e-6)
        back = coords_from_model(t.apply_coords(coords, (h, w)), (h, w), target)
        np.testing.assert_allclose(back, coords, rtol=1e-5, atol=1e-3)


def test_resize_longest_side_images():
    rng = np.random.default_rng(1)
    for h, w, target in _random_sizes(rng, 25):
        h, w, target = max(1, h // 20), max(1, w // 20), min(target, 128)  # small images, quick resizes
        if min(resized_shape(h, w, target)) < 1:
            continue
        t = ResizeLongestSide(target)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        resized = t.apply_image(image)
        assert resized.dtype == np.uint8 and resized.shape == (*resized_shape(h, w, target), 3)
        want = np.array(Image.fromarray(image).resize(resized.shape[1::-1], Image.BILINEAR))
        np.testing.assert_array_equal(resized, want)
        batch = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        out = t.apply_image_torch(batch)
        assert out.shape == (1, 3, *resized_shape(h, w, target))
        want_t = torch.nn.functional.interpolate(batch, out.shape[-2:], mode="bilinear", align_corners=False,
                                                 antialias=True)
        assert torch.equal(out, want_t)


def test_predictor_transform(golden_models):
    sam, _ = golden_models["vit_t"]
    predictor = SamPredictor(sam)
    assert isinstance(predictor.transform, ResizeLongestSide)
    assert predictor.transform.target_length == sam.image_encoder.img_size == 1024
    image = np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predictor.transform_image(image), predictor.transform.apply_image(image))
    with pytest.raises(ValueError, match="target_length"):
        ResizeLongestSide(0)


# --------------------------------------------------------------------------------------------------
# anyseg.utils.amg
# --------------------------------------------------------------------------------------------------

DELEGATED = ["area_from_rle", "batched_mask_to_box", "box_xyxy_to_xywh", "build_all_layer_point_grids",
             "build_point_grid", "calculate_stability_score", "coco_encode_rle", "generate_crop_boxes",
             "is_box_near_crop_edge", "remove_small_regions", "rle_to_mask", "uncrop_boxes_xyxy",
             "uncrop_masks", "uncrop_points"]


def test_amg_helpers_are_anyseg_masks():
    for name in DELEGATED:
        assert getattr(reference_amg, name) is getattr(M, name), name
    assert reference_amg.mask_to_rle_pytorch is M.mask_to_rle
    assert set(reference_amg.__all__) == set(DELEGATED) | {"mask_to_rle_pytorch", "MaskData", "batch_iterator"}


@pytest.mark.golden
def test_amg_helpers_reproduce_the_reference_tables(amg_helpers):
    """A user script over the reference module's names, checked against the tables the reference made."""
    from anyseg.utils.amg import build_all_layer_point_grids, generate_crop_boxes, remove_small_regions
    from conftest import unpack_masks

    for case in amg_helpers["crop_boxes"]:
        boxes, layers = generate_crop_boxes(tuple(case["im_size"]), case["n_layers"], case["overlap_ratio"])
        assert (boxes, layers) == (case["boxes"], case["layer_idxs"])
    for case in amg_helpers["point_grids"]:
        grids = build_all_layer_point_grids(case["n_per_side"], case["n_layers"], case["scale_per_layer"])
        for ours, ref in zip(grids, case["grids"], strict=True):
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    for case in amg_helpers["small_regions"]:
        mask = unpack_masks(np.asarray(case["mask_packed"], np.uint8), case["shape"])
        result, changed = remove_small_regions(mask, case["area_thresh"], case["mode"])
        assert changed == case["changed"]
        np.testing.assert_array_equal(result, unpack_masks(np.asarray(case["result_packed"], np.uint8), case["shape"]))


def test_rle_round_trip_in_reference_names():
    from anyseg.utils.amg import area_from_rle, coco_encode_rle, mask_to_rle_pytorch, rle_to_mask
    from pycocotools import mask as mask_utils

    masks = torch.from_numpy(np.random.default_rng(3).random((4, 13, 17)) > 0.6)
    masks[1] = True
    masks[2] = False
    for mask, rle in zip(masks, mask_to_rle_pytorch(masks)):
        assert rle["size"] == [13, 17] and all(type(c) is int for c in rle["counts"])
        np.testing.assert_array_equal(rle_to_mask(rle), mask.numpy())
        assert area_from_rle(rle) == int(mask.sum())
        coco = coco_encode_rle(rle)
        assert isinstance(coco["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode({**coco, "counts": coco["counts"].encode()}), mask.numpy())


def test_mask_data_and_batch_iterator():
    from anyseg.utils.amg import MaskData, batch_iterator

    data = MaskData(masks=torch.arange(5), boxes=np.arange(10).reshape(5, 2), rles=list("abcde"), extra=None)
    data.filter(torch.tensor([True, False, True, True, False]))
    assert data["masks"].tolist() == [0, 2, 3] and data["boxes"][:, 0].tolist() == [0, 4, 6]
    assert data["rles"] == ["a", "c", "d"] and data["extra"] is None
    data.filter(torch.tensor([2, 0]))
    assert data["masks"].tolist() == [3, 0] and data["rles"] == ["d", "a"] and data["boxes"][:, 1].tolist() == [7, 1]
    more = MaskData(masks=torch.tensor([9]), boxes=np.array([[8, 9]]), rles=["z"], extra=[1])
    data.cat(more)
    assert data["masks"].tolist() == [3, 0, 9] and data["rles"] == ["d", "a", "z"] and data["extra"] == [1]
    assert data["boxes"].shape == (3, 2)
    more["rles"].append("changed")  # cat copied the lists it took
    assert data["extra"] == [1] and data["rles"] == ["d", "a", "z"]
    del data["extra"]
    assert "extra" not in data and set(k for k, _ in data.items()) == {"masks", "boxes", "rles"}
    data.to_numpy()
    assert isinstance(data["masks"], np.ndarray)
    with pytest.raises(TypeError, match="list, numpy array or torch tensor"):
        MaskData(bad=3)

    batches = list(batch_iterator(2, np.arange(5), list("abcde")))
    assert [b[0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert [b[1] for b in batches] == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValueError, match="one length"):
        list(batch_iterator(2, [1, 2], [1]))


# --------------------------------------------------------------------------------------------------
# Package-level names
# --------------------------------------------------------------------------------------------------

PACKAGE_NAMES = ["sam_model_registry", "build_sam", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b",
                 "build_sam_vit_t"]


@pytest.mark.parametrize("name", PACKAGE_NAMES)
def test_package_exports(name):
    from anyseg import dropin

    if anyseg._EXPORTS.get(name) != "dropin":
        pytest.skip(f"anyseg/__init__.py's _EXPORTS does not map {name!r} to 'dropin' yet")
    assert getattr(anyseg, name) is getattr(dropin, name)
    assert name in anyseg.__all__
