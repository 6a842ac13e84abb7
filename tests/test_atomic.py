"""Atomic writes: the final file appears complete or not at all."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anyseg.atomic import atomic_write, write_bytes_atomic, write_json_atomic, write_png_atomic


def test_failure_keeps_previous_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write('{"a": 2')
            raise RuntimeError("killed half-way")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_unserialisable_json_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "x.json", {"a": object()})
    assert list(tmp_path.iterdir()) == []


def test_numpy_values_and_parents(tmp_path):
    path = write_json_atomic(tmp_path / "deep" / "dir" / "x.json", {"n": np.int64(3), "v": np.arange(3)})
    assert json.loads(path.read_text()) == {"n": 3, "v": [0, 1, 2]}
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("array,mode", [
    (np.eye(4, dtype=bool), "L"),
    (np.arange(16, dtype=np.uint8).reshape(4, 4), "L"),
    (np.arange(16, dtype=np.uint16).reshape(4, 4) * 1000, "I;16"),
    (np.zeros((4, 4, 3), np.uint8), "RGB"),
    (np.zeros((4, 4, 4), np.uint8), "RGBA"),
])
def test_png_round_trip(tmp_path, array, mode):
    path = write_png_atomic(tmp_path / "m.png", array)
    back = Image.open(path)
    assert back.mode == mode
    expected = array.astype(np.uint8) * 255 if array.dtype == bool else array
    assert np.array_equal(np.asarray(back), expected)


def test_png_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="HxW"):
        write_png_atomic(tmp_path / "x.png", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_png_atomic(tmp_path / "x.png", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="modes"):
        with atomic_write(tmp_path / "x", "a"):
            pass
    assert list(tmp_path.iterdir()) == []
