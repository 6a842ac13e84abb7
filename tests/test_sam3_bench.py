"""``anyseg bench`` SAM 3 rows on the golden SAM 3 checkpoint: the per-phrase rows and the quality rows
(the text cache gives the reference's detections exactly; explicit attention agrees to rounding)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import GOLDEN, IMAGES, _require

pytestmark = [pytest.mark.golden, pytest.mark.slow]


def test_sam3_rows_and_quality():
    from anyseg.fast.benchmark import format_tables, run_sam3
    from anyseg.imageio import load_image

    image = load_image(_require(IMAGES) / "groceries.jpg")[::2, ::2]  # 400 x 267: masks at the image size
    rows, quality = run_sam3(__import__("torch").device("cpu"), ("sam3_phrase", "sam3_quality"), True, image,
                             _require(GOLDEN / "sam3") / "sam3_checkpoint.pt", repeats=1, log=lambda s: None)
    assert [r["config"] for r in rows] == ["reference", "lossless"]
    assert all(r["wall"] > 0 and r["cpu"] > 0 and r["unit"] == "phrase/s" for r in rows)
    assert rows[0]["speedup"] == 1.0
    by = {q["config"]: q for q in quality}
    assert by["lossless"]["min_mask_iou"] == 1.0 and by["lossless"]["max_score_err"] == 0.0
    assert by["explicit"]["min_mask_iou"] >= 0.999 and by["explicit"]["max_score_err"] < 1e-4
    assert by["lossless"]["instances"] > 0  # the phrases find something in groceries.jpg
    table = format_tables({"date": "d", "machine": "m", "device": "cpu"}, rows, quality)
    assert "SAM 3 rows" in table and "sam3_phrase" in table and np.isfinite(rows[1]["throughput"])
