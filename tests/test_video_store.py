"""The bounded per-object output store of the video predictor."""
from __future__ import annotations

import os

import pytest
import torch

from anyseg.modeling.sam2.tracking import FrameOutput
from anyseg.video.store import OutputStore, SpillDir


def _out(seed: int) -> FrameOutput:
    g = torch.Generator().manual_seed(seed)
    return FrameOutput(pred_masks=torch.randn(1, 1, 8, 8, generator=g), obj_ptr=torch.randn(1, 16, generator=g),
                       object_score=torch.randn(1, 1, generator=g),
                       maskmem_features=torch.randn(1, 4, 4, 4, generator=g).to(torch.bfloat16))


def test_spill_and_reload_is_exact(tmp_path):
    spill = SpillDir(str(tmp_path))
    store = OutputStore(spill, keep_in_memory=2)
    for t in range(10):
        store[t] = _out(t)
    assert len(store) == 10 and store.frames_in_memory == 2
    assert len(os.listdir(spill.path)) == 8
    for t in (0, 9, 3):
        want = _out(t)
        got = store[t]
        assert torch.equal(got.pred_masks, want.pred_masks)
        assert torch.equal(got.maskmem_features, want.maskmem_features)
        assert got.maskmem_features.dtype == torch.bfloat16
        assert torch.equal(got.obj_ptr, want.obj_ptr)
    assert store.frames_in_memory == 2
    # Pointers and scores never leave memory: reading them loads nothing.
    before = len(os.listdir(spill.path))
    _ = [store[t].obj_ptr for t in range(10)]
    assert len(os.listdir(spill.path)) == before
    del store[4]
    assert 4 not in store and len(store) == 9
    store.set_memory(5, torch.zeros(1, 4, 4, 4, dtype=torch.bfloat16))
    assert torch.equal(store[5].maskmem_features, torch.zeros(1, 4, 4, 4, dtype=torch.bfloat16))
    assert torch.equal(store[5].pred_masks, _out(5).pred_masks)
    store.clear()
    assert len(store) == 0 and os.listdir(spill.path) == []
    path = spill.path
    spill.close()
    assert not os.path.exists(path)


def test_without_spill_everything_stays_in_memory():
    store = OutputStore(None, keep_in_memory=1)
    for t in range(5):
        store[t] = _out(t)
    assert store.frames_in_memory == 5
    with pytest.raises(KeyError):
        store[7]
    # Moving a stored output to another store copies its tensors.
    other = OutputStore(None)
    other[2] = store[2]
    assert torch.equal(other[2].pred_masks, _out(2).pred_masks)
