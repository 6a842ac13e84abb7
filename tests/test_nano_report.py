"""scripts/nano_report.py: the qualitative report of a model on scikit-image's sample photographs.

Runs the script on one photograph with the built-in nano model (a few seconds on a CPU) and checks the
contact sheet pixel by pixel against the masks the script returns.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "nano_report.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("nano_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nano_report"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


def _far_from(shape, points=(), boxes=(), radius=10):
    """``h x w`` bool: True at pixels more than ``radius`` from every point and every box edge."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    keep = np.ones(shape, bool)
    for x, y in points:
        keep &= (xx - x) ** 2 + (yy - y) ** 2 > radius**2
    for x0, y0, x1, y1 in boxes:
        inside = (xx >= x0 - radius) & (xx <= x1 + radius) & (yy >= y0 - radius) & (yy <= y1 + radius)
        interior = (xx > x0 + radius) & (xx < x1 - radius) & (yy > y0 + radius) & (yy < y1 - radius)
        keep &= ~(inside & ~interior)
    return keep


def test_report_on_one_photograph(script, tmp_path):
    pytest.importorskip("skimage", reason="needs scikit-image for the sample photographs (pip install scikit-image)")
    out = tmp_path / "report"
    reports = script.main(["-o", str(out), "--images", "chelsea", "--size", "200", "--format", "png", "--no-progress"])

    assert [r.name for r in reports] == ["chelsea"]
    rep = reports[0]
    assert rep.original_size == (300, 451)  # skimage.data.chelsea()
    h, w = rep.display_size
    assert max(h, w) == 200 and abs(w / h - 451 / 300) < 0.02

    sheet_path = out / "chelsea.png"
    assert rep.sheet_path == sheet_path and sheet_path.is_file()
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files
    with Image.open(sheet_path) as im:
        im.verify()
    sheet = np.asarray(Image.open(sheet_path).convert("RGB"))
    assert sheet.shape == (script.CAPTION_HEIGHT + h, 3 * w + 2 * script.GAP, 3)

    sample = {s.name: s for s in script.SAMPLES}["chelsea"]
    scale = np.array([w / 451, h / 300])
    point = np.array(sample.point) * scale
    box = np.array(sample.box) * np.tile(scale, 2)
    markers = {"point": dict(points=[point]), "box": dict(boxes=[box]), "everything": {}}

    assert [r.kind for r in rep.results] == ["point", "box", "everything"]
    for result in rep.results:
        x0, y0, x1, y1 = result.panel_box
        panel = sheet[y0:y1, x0:x1].astype(int)
        assert panel.shape == (h, w, 3)
        assert result.mask.shape == (h, w) and result.mask.dtype == bool
        assert 0.0 <= result.area_fraction <= 1.0
        clear = _far_from((h, w), **markers[result.kind])
        changed = np.any(panel != rep.display_image.astype(int), axis=2)
        inside, outside = result.mask & clear, ~result.mask & clear
        if result.kind in ("point", "box"):
            assert result.num_masks == 1 and 0.0 < result.score <= 1.5
            assert inside.sum() > 20, f"{result.kind}: the mask is (almost) empty"
        if inside.any():
            assert changed[inside].mean() > 0.99, f"{result.kind}: the overlay does not colour the mask"
        assert not changed[outside].any(), f"{result.kind}: the overlay changed pixels outside the mask"
        # The mask area measured at full size agrees with the display-size mask it was drawn from.
        assert abs(result.mask.mean() - result.area_fraction) < 0.02

    summary = json.loads((out / "report.json").read_text())
    assert summary["model"] == "nano"
    (entry,) = summary["images"]
    assert entry["name"] == "chelsea" and entry["file"] == "chelsea.png" and entry["licence"]
    assert [r["prompt"] for r in entry["results"]] == ["point", "box", "everything"]
    assert entry["results"][0]["area_fraction"] == pytest.approx(rep.results[0].area_fraction, abs=1e-4)


def test_missing_scikit_image_names_the_package(script, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage` raise ImportError
    with pytest.raises(SystemExit, match="pip install scikit-image"):
        script.main(["-o", str(tmp_path), "--no-progress"])
    assert not any(tmp_path.iterdir())


def test_unknown_image_name_is_rejected(script, tmp_path):
    pytest.importorskip("skimage", reason="needs scikit-image for the sample photographs (pip install scikit-image)")
    with pytest.raises(SystemExit, match="expected names from chelsea"):
        script.main(["-o", str(tmp_path), "--images", "chelsea,nosuchimage", "--no-progress"])
