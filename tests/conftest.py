"""Shared test fixtures.

The reference data lives outside the repository, in ``../shared`` beside the checkout (override with
the ``ANYSEG_SHARED`` environment variable). It is read in place and never copied.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ANYSEG_SHARED", REPO.parent / "shared")).resolve()
GOLDEN = SHARED / "golden"
IMAGES = SHARED / "images"


def _require(path: Path) -> Path:
    if not path.exists():
        # Golden data must be present in CI and under `make test` (which sets ANYSEG_REQUIRE_SHARED):
        # there a missing directory is a set-up error, not a skip.
        if os.environ.get("CI") or os.environ.get("ANYSEG_REQUIRE_SHARED"):
            raise FileNotFoundError(f"reference data not found at {path} (set ANYSEG_SHARED)")
        pytest.skip(f"reference data not found at {path} (set ANYSEG_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _require(GOLDEN)


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return _require(IMAGES)


@pytest.fixture(scope="session")
def manifest(golden_dir) -> dict:
    return json.loads((golden_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def amg_helpers(golden_dir) -> dict:
    return json.loads((golden_dir / "amg_helpers.json").read_text())


def unpack_masks(packed: np.ndarray, shape) -> np.ndarray:
    """Unpack the golden bit-packed boolean masks (see golden/README.md)."""
    shape = tuple(int(s) for s in shape)
    return np.unpackbits(packed, axis=-1)[..., : shape[-1]].reshape(shape).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(bool)
    b = b.astype(bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def golden_prompt_kwargs(case: dict, golden) -> dict:
    """``SamPredictor.predict`` keyword arguments of one single-prompt golden predictor case."""
    kwargs = dict(point_coords=case["point_coords"] and np.array(case["point_coords"]),
                  point_labels=case["point_labels"] and np.array(case["point_labels"]),
                  box=None if case["box"] is None else np.array(case["box"]),
                  multimask_output=case["multimask_output"])
    if "mask_input" in case:
        kwargs["mask_input"] = golden["refine_mask_input"]
    return kwargs


def check_golden_outputs(name: str, golden, masks: np.ndarray, iou: np.ndarray, low_res: np.ndarray) -> None:
    """The golden tolerances: IoU scores 1e-3, low-res logits 1e-2 (absolute), every mask IoU >= 0.999."""
    assert masks.shape == tuple(golden[f"{name}_masks_shape"])
    want_masks = unpack_masks(golden[f"{name}_masks_packed"], golden[f"{name}_masks_shape"])
    np.testing.assert_allclose(iou, golden[f"{name}_iou"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(low_res, golden[f"{name}_low_res_logits"], atol=1e-2, rtol=0)
    flat_got = masks.reshape(-1, *masks.shape[-2:])
    flat_want = want_masks.reshape(-1, *want_masks.shape[-2:])
    for got, want in zip(flat_got, flat_want):
        assert mask_iou(got, want) >= 0.999
