"""End-to-end: ``anyseg auto`` on small real images with the golden MobileSAM checkpoint, resumed."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from anyseg import formats
from anyseg.cli import build_parser, main
from anyseg.cli import auto

pytestmark = pytest.mark.slow  # two images through MobileSAM on CPU, then a resumed run

# A small grid and thresholds that keep masks even with the golden (random) weights.
GENERATOR_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "-100", "--stability-score-thresh", "0.4",
                  "--box-nms-thresh", "1", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(golden_dir):
    return str(golden_dir / "mobilesam_checkpoint.pth")


@pytest.fixture(scope="module")
def inputs(images_dir, tmp_path_factory):
    """in/dog.jpg and in/dog.png (same stem), in/sub/broken.jpg (corrupt). Made here, never committed."""
    root = tmp_path_factory.mktemp("auto") / "in"
    (root / "sub").mkdir(parents=True)
    with Image.open(images_dir / "dog.jpg") as im:
        im.convert("RGB").resize((96, 64)).save(root / "dog.jpg", quality=95)
    with Image.open(images_dir / "groceries.jpg") as im:
        im.convert("RGB").crop((300, 200, 372, 280)).save(root / "dog.png")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
    return root


@pytest.fixture(scope="module")
def first_run(inputs, checkpoint, tmp_path_factory):
    """Run once with every format; returns (args, outdir, status, stdout, stderr)."""
    out = tmp_path_factory.mktemp("auto_out") / "out"
    args = ["auto", str(inputs), "-o", str(out), "--format", "sa1b,coco", "-f", "png", "-f", "polygons",
            "-m", checkpoint, *GENERATOR_ARGS]
    capture = _Capture()
    with capture:
        status = main(args)
    return args, out, status, capture.out, capture.err


class _Capture:
    """Collects stdout / stderr of a block (capsys is function-scoped, the run is module-scoped)."""

    def __enter__(self):
        import contextlib
        import io

        self._out, self._err = io.StringIO(), io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._out))
        self._stack.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self.out, self.err = self._out.getvalue(), self._err.getvalue()


def _bbox_xywh(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]


def test_first_run_writes_valid_outputs_and_reports_the_corrupt_file(first_run, inputs):
    _, out, status, stdout, stderr = first_run
    assert status == 1, "a failed image makes the exit status 1"
    assert "broken.jpg" in stderr and "failed" in stderr
    assert "2 processed, 0 skipped (already done), 1 failed" in stdout

    coco = {im["file_name"]: recs for im, recs in formats.read_coco_json(out / auto.COCO_FILE)}
    assert sorted(coco) == ["dog.jpg", "dog.png"]
    for base, source in (("dog_jpg", "dog.jpg"), ("dog_png", "dog.png")):
        with Image.open(inputs / source) as im:
            image = np.asarray(im.convert("RGB"))
        h, w = image.shape[:2]
        info, records = formats.read_sa1b_json(out / f"{base}.json")
        assert (info["width"], info["height"], info["file_name"]) == (w, h, source)
        assert len(records) > 1
        for r in records:
            mask = r["segmentation"]
            assert mask.shape == (h, w) and mask.dtype == bool
            assert r["area"] == mask.sum() > 0
            assert r["bbox"] == _bbox_xywh(mask)
            assert r["crop_box"] == [0, 0, w, h]
        masks = np.stack([r["segmentation"] for r in records])

        labels = formats.read_label_png(out / f"{base}_labels.png")
        np.testing.assert_array_equal(labels, formats.label_map(records))
        assert labels.max() <= len(records)

        _, from_polygons = formats.read_polygons_json(out / f"{base}_polygons.json")
        np.testing.assert_array_equal(np.stack([r["segmentation"] for r in from_polygons]), masks)
        yolo = formats.read_yolo_seg(out / f"{base}_yolo.txt", w, h)
        assert len(yolo) == len(records) and all(cls == 0 for cls, _ in yolo)
        np.testing.assert_array_equal(np.stack([m for _, m in yolo]), masks)

        with Image.open(out / f"{base}_overlay.png") as im:
            overlay = np.asarray(im)
        assert overlay.shape == (h, w, 3) and np.any(overlay != image)

        np.testing.assert_array_equal(np.stack([r["segmentation"] for r in coco[source]]), masks)
        assert [r["predicted_iou"] for r in coco[source]] == [r["predicted_iou"] for r in records]

    assert not (out / "sub").exists() or not any((out / "sub").iterdir()), "nothing is written for a failed image"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "no temporary files are left behind"
    # The COCO file is what pycocotools expects.
    from pycocotools.coco import COCO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        api = COCO(str(out / auto.COCO_FILE))
        ann = api.loadAnns(api.getAnnIds(imgIds=[1]))[0]
        assert api.annToMask(ann).shape == (64, 96)


def test_second_run_skips_finished_images(first_run):
    args, out, _, _, _ = first_run
    per_image = sorted(p for p in out.rglob("*") if p.is_file() and p.name != auto.COCO_FILE)
    stamps = {p: p.stat().st_mtime_ns for p in per_image}
    coco_before = json.loads((out / auto.COCO_FILE).read_text())
    capture = _Capture()
    with capture:
        status = main(args)
    assert status == 1
    assert "0 processed, 2 skipped (already done), 1 failed" in capture.out
    assert "broken.jpg" in capture.err
    assert {p: p.stat().st_mtime_ns for p in per_image} == stamps, "finished images are not rewritten"
    assert json.loads((out / auto.COCO_FILE).read_text()) == coco_before, "the COCO file is rebuilt identically"


def test_finished_marker_checks_settings_source_and_files(first_run, inputs):
    args, out, _, _, _ = first_run
    parsed = build_parser().parse_args(args)
    parsed.formats = ["sa1b", "coco", "png", "polygons"]
    settings = auto._settings(parsed)
    jobs = auto.plan_jobs([str(inputs)], out)
    job = next(j for j in jobs if j.base == "dog_jpg")
    files = auto.output_files(job.base, parsed.formats, overlay=True)
    assert auto._finished(out, job, files, settings) is not None
    assert auto._finished(out, job, files, {**settings, "points_per_side": 8}) is None
    assert auto._finished(out, job, files + ["dog_jpg_other.png"], settings) is None
    st = os.stat(job.path)
    try:
        os.utime(job.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert auto._finished(out, job, files, settings) is None, "a changed source file is redone"
    finally:
        os.utime(job.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert auto._finished(out, job, files, settings) is not None


def test_output_names_are_relative_and_collision_free(tmp_path):
    root = tmp_path / "data"
    for rel in ("x.jpg", "x.png", "s/x.jpg", "coco_instances.jpg", "out/y.png", "notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    jobs = auto.plan_jobs([str(root)], root / "out")  # images inside OUTDIR are not inputs
    assert [(j.rel, j.base) for j in jobs] == [
        ("coco_instances.jpg", "coco_instances_jpg"), ("s/x.jpg", "s/x"), ("x.jpg", "x_jpg"), ("x.png", "x_png")]
    jobs = auto.plan_jobs([str(root / "s"), str(root / "x.png")], tmp_path / "o")
    assert [(j.rel, j.base) for j in jobs] == [("s/x.jpg", "s/x"), ("x.png", "x")]
    jobs = auto.plan_jobs([str(root / "*.png")], tmp_path / "o")
    assert [(j.rel, j.base) for j in jobs] == [("x.png", "x")]
    with pytest.raises(FileNotFoundError):
        auto.plan_jobs([str(root / "out")], root / "out")


def test_bad_model_and_missing_input_are_errors(inputs, tmp_path, capsys):
    status = main(["auto", str(inputs / "dog.png"), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "none.pth"),
                   "--no-progress"])
    assert status == 2
    assert "none.pth" in capsys.readouterr().err
    assert main(["auto", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["auto", str(inputs), "-o", str(tmp_path / "o"), "--format", "tiff"])
    with pytest.raises(SystemExit):
        main(["auto", str(inputs), "-o", str(tmp_path / "o"), "--box-nms-thresh", "1.5"])


def test_help_lists_formats_options_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["auto", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag, *_ in auto.GENERATOR_OPTIONS:
        assert flag in text
    for word in ("examples:", "--format", "sa1b", "coco", "png", "polygons", "--no-overlay", "--model",
                 "skipped"):
        assert word in text
