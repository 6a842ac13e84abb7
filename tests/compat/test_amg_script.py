"""The reference's automatic mask generator notebook and ``scripts/amg.py`` flow, with only the import
changed (and PIL for reading and writing images): the records must equal the golden data and
``anyseg.MaskGenerator``'s.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anyseg
from anyseg import masks as M
from compat_helpers import MISMATCH, golden_models, read_rgb  # noqa: F401 (fixture)
from conftest import mask_iou

# The imports user code makes, with ``segment_anything`` replaced by ``anyseg``.
from anyseg import SamAutomaticMaskGenerator
from anyseg.dropin import sam_model_registry


def amg_script(argv) -> None:
    """The flow of the reference's ``scripts/amg.py`` (flags, builder, generator, outputs), written here
    with only the import changed (and PIL for reading / writing images)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--model-type", default="default")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--convert-to-rle", action="store_true")
    for flag, kind in [("points-per-side", int), ("points-per-batch", int), ("pred-iou-thresh", float),
                       ("stability-score-thresh", float), ("stability-score-offset", float),
                       ("box-nms-thresh", float), ("crop-n-layers", int), ("crop-nms-thresh", float),
                       ("crop-overlap-ratio", float), ("crop-n-points-downscale-factor", int),
                       ("min-mask-region-area", int)]:
        parser.add_argument(f"--{flag}", type=kind, default=None)
    args = parser.parse_args(argv)

    sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint)
    _ = sam.to(device=args.device)
    output_mode = "coco_rle" if args.convert_to_rle else "binary_mask"
    names = ["points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
             "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio",
             "crop_n_points_downscale_factor", "min_mask_region_area"]
    amg_kwargs = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    generator = SamAutomaticMaskGenerator(sam, output_mode=output_mode, **amg_kwargs)

    targets = [args.input] if not os.path.isdir(args.input) else sorted(
        os.path.join(args.input, f) for f in os.listdir(args.input))
    os.makedirs(args.output, exist_ok=True)
    for t in targets:
        image = read_rgb(t)
        masks = generator.generate(image)
        base = os.path.join(args.output, os.path.splitext(os.path.basename(t))[0])
        if output_mode == "binary_mask":
            os.makedirs(base, exist_ok=False)
            header = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
                      "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
            lines = [header]
            for i, ann in enumerate(masks):
                Image.fromarray(ann["segmentation"].astype(np.uint8) * 255).save(os.path.join(base, f"{i}.png"))
                row = [str(i), str(ann["area"]), *[str(x) for x in ann["bbox"]],
                       *[str(x) for x in ann["point_coords"][0]], str(ann["predicted_iou"]),
                       str(ann["stability_score"]), *[str(x) for x in ann["crop_box"]]]
                lines.append(",".join(row))
            with open(os.path.join(base, "metadata.csv"), "w") as f:
                f.write("\n".join(lines))
        else:
            with open(base + ".json", "w") as f:
                json.dump(masks, f)


@pytest.mark.golden
def test_amg_script_coco_rle(golden_dir, images_dir, manifest, tmp_path):
    spec = manifest["mobilesam"]["amg"][0]  # every mask of a 6 x 6 grid kept: 108 records to compare
    golden = json.loads((golden_dir / spec["file"]).read_text())
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in spec["params"].items()]
    amg_script(["--input", str(images_dir / golden["image"]), "--output", str(tmp_path), "--model-type", "vit_t",
                "--checkpoint", str(golden_dir / "mobilesam_checkpoint.pth"), "--convert-to-rle", *flags])
    records = json.loads((tmp_path / (Path(golden["image"]).stem + ".json")).read_text())
    # the reference's records (golden tolerances; test_golden_amg pins anyseg.MaskGenerator to the same
    # data, and test_amg_script_binary_masks_folder compares the script with it record for record)
    assert len(records) == len(golden["masks"]) == spec["n_masks"]
    for ours, ref in zip(records, golden["masks"]):
        assert ours["segmentation"]["size"] == ref["segmentation"]["size"]
        assert mask_iou(M.coco_rle_to_mask(ours["segmentation"]), M.coco_rle_to_mask(ref["segmentation"])) >= 0.99
        assert abs(ours["predicted_iou"] - ref["predicted_iou"]) <= 1e-3
        assert abs(ours["stability_score"] - ref["stability_score"]) <= 1e-3
        assert np.max(np.abs(np.subtract(ours["bbox"], ref["bbox"]))) <= 2
        assert ours["point_coords"] == ref["point_coords"] and ours["crop_box"] == ref["crop_box"]


@pytest.mark.golden
@pytest.mark.filterwarnings(MISMATCH)
def test_amg_script_binary_masks_folder(golden_dir, images_dir, tmp_path, golden_models):
    inputs = tmp_path / "in"
    inputs.mkdir()
    small = np.ascontiguousarray(read_rgb(images_dir / "groceries.jpg")[::2, ::2])
    Image.fromarray(small).save(inputs / "groceries.png")
    params = dict(points_per_side=4, pred_iou_thresh=-100.0, stability_score_thresh=-1.0, box_nms_thresh=0.9)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
    amg_script(["--input", str(inputs), "--output", str(tmp_path / "out"), "--model-type", "vit_b",
                "--checkpoint", str(golden_dir / "vit_small_checkpoint.pth"), *flags])
    folder = tmp_path / "out" / "groceries"
    rows = list(csv.DictReader((folder / "metadata.csv").open()))
    want = anyseg.MaskGenerator(golden_models["vit_b"][1], **params).generate(small)
    assert len(rows) == len(want) > 0
    for i, (row, rec) in enumerate(zip(rows, want)):
        saved = np.array(Image.open(folder / f"{i}.png")) > 0
        np.testing.assert_array_equal(saved, rec["segmentation"])
        assert int(row["area"]) == rec["area"]
        assert [float(row[k]) for k in ("bbox_x0", "bbox_y0", "bbox_w", "bbox_h")] == rec["bbox"]
        assert float(row["predicted_iou"]) == rec["predicted_iou"]


