"""The built-in "nano" model: shipped in the package, loaded by name without any download, and
better than chance on held-out synthetic scenes (see docs/nano.md for how it was trained)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import anyseg
from anyseg import hub
from anyseg.train.datasets import open_dataset
from anyseg.train.evaluate import EvalConfig, evaluate

WEIGHTS = Path(anyseg.__file__).resolve().parent / "weights" / "nano.safetensors"

# Held-out scenes not used in docs/nano.md (seed 2000), small enough to run in seconds.
HELDOUT = "synthetic:count=20,seed=2000,size=128,objects=1-4,parts=0"
# Measured on these 46 instances: 1-point oracle 0.751, box 0.787 (docs/nano.md); the floors leave
# ~0.1 for other CPUs' rounding (the float16 weights are exact, the forward pass is float32).
POINT_FLOOR = 0.65
BOX_FLOOR = 0.68


@pytest.fixture(scope="module")
def nano(tmp_path_factory, request):
    # An empty cache and no network: the name must resolve to the packaged file.
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    mp.setenv("ANYSEG_HOME", str(tmp_path_factory.mktemp("empty-cache")))
    mp.setenv("ANYSEG_OFFLINE", "1")
    return anyseg.load_model("nano")


def test_weights_are_small_and_half_precision():
    from safetensors import safe_open

    assert WEIGHTS.is_file(), "anyseg/weights/nano.safetensors is missing"
    assert WEIGHTS.stat().st_size <= 25 * 2**20
    with safe_open(str(WEIGHTS), framework="pt") as fh:
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}
    assert dtypes == {torch.float16}


def test_name_resolves_offline_to_the_packaged_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ANYSEG_HOME", str(tmp_path))
    monkeypatch.setenv("ANYSEG_OFFLINE", "1")
    assert hub.resolve_checkpoint("nano") == WEIGHTS
    assert hub.resolve_checkpoint("NANO") == WEIGHTS
    assert "nano" in hub.BUNDLED and "nano" not in hub.REGISTRY
    assert not any(tmp_path.rglob("*.safetensors"))  # nothing copied into the cache


def test_load_and_output_shapes(nano):
    assert nano.img_size == 128
    assert next(nano.parameters()).dtype == torch.float32
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 140, 3), dtype=np.uint8)
    predictor = anyseg.SamPredictor(nano)
    predictor.set_image(image)
    masks, scores, low = predictor.predict(point_coords=np.array([[70.0, 45.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 90, 140) and masks.dtype == bool
    assert scores.shape == (3,)
    assert low.shape == (3, 64, 64)
    masks, scores, low = predictor.predict(box=np.array([10, 10, 80, 60]), multimask_output=False)
    assert masks.shape == (1, 90, 140) and scores.shape == (1,) and low.shape == (1, 64, 64)


def test_heldout_synthetic_miou_above_floor(nano):
    result = evaluate(nano, open_dataset(HELDOUT), EvalConfig(clicks=1, max_instances=4), progress=False).summary()
    assert result["instances"] >= 30
    assert result["point_oracle_miou"] > POINT_FLOOR, result
    assert result["box_miou"] > BOX_FLOOR, result
