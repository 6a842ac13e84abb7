"""``anyseg auto INPUT... --text PHRASES`` with a SAM 3 model, end to end on the golden checkpoint: every
format holds exactly the instances Sam3Processor finds (groceries.jpg also against the golden
detections), the COCO categories are the phrases, and a second run resumes."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import GOLDEN, IMAGES, _require, mask_iou, unpack_masks

pytestmark = [pytest.mark.golden, pytest.mark.slow]

SAM3 = GOLDEN / "sam3"
PHRASES = ["green vegetables", "red apple"]


def _main(args):
    from anyseg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """in/groceries.jpg (a golden image) and in/sub/truck.png (truck.jpg at a quarter of its size)."""
    root = tmp_path_factory.mktemp("sam3_auto") / "in"
    (root / "sub").mkdir(parents=True)
    (root / "groceries.jpg").write_bytes((_require(IMAGES) / "groceries.jpg").read_bytes())
    with Image.open(IMAGES / "truck.jpg") as im:
        im.convert("RGB").resize((450, 300)).save(root / "sub" / "truck.png")
    return root


@pytest.fixture(scope="module")
def run_args(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sam3_auto_out") / "out"
    return ["auto", str(inputs), "-o", str(out), "--model", str(_require(SAM3) / "sam3_checkpoint.pt"), "--device",
            "cpu", "--speed", "faithful",  # the reference computation on every CPU (auto: bf16 where native)
            "--text", ". ".join(PHRASES), "--format", "sa1b,coco,png,polygons", "--no-progress"], out


@pytest.fixture(scope="module")
def first_run(run_args):
    args, out = run_args
    return _main(args)


@pytest.fixture(scope="module")
def expected(inputs):
    """What Sam3Processor finds in each input, per phrase: {rel: [(category_id, phrase, mask, score), ...]}."""
    from anyseg import Sam3Processor, load_model

    model = load_model(SAM3 / "sam3_checkpoint.pt", device="cpu")
    processor = Sam3Processor(model, resolution=model.image_size)
    found = {}
    for rel in ("groceries.jpg", "sub/truck.png"):
        state = processor.set_image(inputs / rel)
        found[rel] = []
        for k, phrase in enumerate(PHRASES):
            result = processor.segment(text=phrase, state=state)
            found[rel] += [(k + 1, phrase, m, float(s)) for m, s in zip(result.masks, result.scores)]
    return found


def test_every_format_holds_the_processor_instances(first_run, run_args, expected):
    from anyseg import formats

    status, stdout, stderr = first_run
    assert status == 0, stderr
    assert "2 processed, 0 skipped (already done), 0 failed" in stdout
    out = run_args[1]
    assert sum(len(v) for v in expected.values()) >= 3  # the small truck has several instances

    coco = json.loads((out / "coco_instances.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "green vegetables", "supercategory": "object"},
                                  {"id": 2, "name": "red apple", "supercategory": "object"}]
    coco_records = {im["file_name"]: recs for im, recs in formats.read_coco_json(coco)}
    assert sorted(coco_records) == ["groceries.jpg", "sub/truck.png"]
    for rel, base in (("groceries.jpg", "groceries"), ("sub/truck.png", "sub/truck")):
        want = expected[rel]
        info, records = formats.read_sa1b_json(out / f"{base}.json")
        assert info["file_name"] == rel and len(records) == len(want)
        for r, (cat, phrase, mask, score), c in zip(records, want, coco_records[rel]):
            np.testing.assert_array_equal(r["segmentation"], mask)
            np.testing.assert_array_equal(c["segmentation"], mask)
            assert (r["category_id"], r["label"], c["category_id"]) == (cat, phrase, cat)
            assert r["score"] == pytest.approx(score, abs=1e-6) and c["score"] == pytest.approx(score, abs=1e-6)
            assert r["area"] == int(mask.sum())
        np.testing.assert_array_equal(formats.read_label_png(out / f"{base}_labels.png"), formats.label_map(records))
        _, polygons = formats.read_polygons_json(out / f"{base}_polygons.json")
        assert [p["category_id"] for p in polygons] == [w[0] for w in want]
        yolo = (out / f"{base}_yolo.txt").read_text().splitlines()
        assert [int(line.split()[0]) for line in yolo] == [w[0] - 1 for w in want if w[2].any()]
        assert (out / f"{base}_overlay.png").is_file()
        marker = json.loads((out / ".anyseg-auto" / f"{base}.done.json").read_text())
        assert marker["settings"]["phrases"] == PHRASES and marker["masks"] == len(want)

    # groceries.jpg: the golden detections of the reference (phrase A found once, phrase B absent).
    golden = np.load(SAM3 / "sam3_groceries.npz")
    want_masks = unpack_masks(golden["text_a_masks_packed"], golden["text_a_masks_shape"])[:, 0]
    _, records = formats.read_sa1b_json(out / "groceries.json")
    assert [r["label"] for r in records] == ["green vegetables"] * len(want_masks)
    np.testing.assert_allclose([r["score"] for r in records], golden["text_a_scores"], atol=2e-3)
    assert all(mask_iou(r["segmentation"], m) >= 0.999 for r, m in zip(records, want_masks))


def test_second_run_resumes(first_run, run_args):
    args, out = run_args
    assert first_run[0] == 0
    coco = (out / "coco_instances.json").read_text()
    status, stdout, _ = _main(args)
    assert status == 0 and "0 processed, 2 skipped (already done)" in stdout
    assert (out / "coco_instances.json").read_text() == coco  # rebuilt from the per-image files
    (out / ".anyseg-auto" / "sub" / "truck.done.json").unlink()  # as if the run had stopped there
    status, stdout, _ = _main(args)
    assert status == 0 and "1 processed, 1 skipped (already done)" in stdout
    assert json.loads((out / "coco_instances.json").read_text()) == json.loads(coco)


def test_concept_errors(inputs, tmp_path):
    model = str(_require(SAM3) / "sam3_checkpoint.pt")
    base = ["auto", str(inputs), "-o", str(tmp_path / "o"), "--no-progress"]
    status, _, err = _main(base + ["--model", model, "--text", " . "])
    assert status != 0 and "holds no phrase" in err
    status, _, err = _main(base + ["--model", model, "--text", "cup. cup"])
    assert status != 0 and "more than once" in err
    status, _, err = _main(base + ["--model", model, "--text", "cup", "--ray", "local"])
    assert status != 0 and "--ray" in err and "--text" in err
    status, _, err = _main(base + ["--model", model])  # a SAM 3 model without phrases
    assert status != 0 and "give --text" in err
