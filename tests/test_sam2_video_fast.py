"""The SAM 2 video fast paths (anyseg.fast.sam2_video) against the faithful path: unit checks on a
small random model, golden video scenarios with ``speed="lossless"`` (golden tolerances) and, on CPUs
with native bfloat16, ``speed="auto"`` (mask IoU >= 0.98 per object and frame); the bounded output store."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from anyseg.fast.sam2_video import (KeyCache, VideoFastRuntime, VideoSpeedConfig, native_bf16, rope,
                                    rope_tables_full)
from anyseg.modeling.sam2.memory_attention import apply_rope, axial_rope_tables
from anyseg.modeling.sam2.tracking import FrameOutput, MemoryPlan, memory_tensors
from anyseg.video.store import OutputStore, SpillDir, TrackedFrames


def _small_model():
    from anyseg.config_sam2 import (HieraConfig, MemoryAttentionConfig, MemoryEncoderConfig, NeckConfig,
                                    Sam2Config)
    from anyseg.modeling.sam2 import build_sam2_model

    trunk = HieraConfig(embed_dim=8, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=(2,),
                        window_spec=(4, 4, 2, 1), window_pos_embed_bkg_spatial_size=(4, 4))
    cfg = Sam2Config(trunk=trunk, neck=NeckConfig(backbone_channel_list=trunk.channel_list), image_size=128,
                     memory_attention=MemoryAttentionConfig(num_layers=2, dim_feedforward=64, feat_sizes=(8, 8)),
                     memory_encoder=MemoryEncoderConfig(fuser_num_layers=1)).for_video()
    torch.manual_seed(0)
    model = build_sam2_model(cfg).eval()
    with torch.no_grad():
        for name in ("maskmem_tpos_enc", "no_mem_embed", "no_obj_ptr", "no_obj_embed_spatial"):
            getattr(model, name).add_(0.3 * torch.randn_like(getattr(model, name)))
    return model


def _plan(frames, n_ptr, seed):
    g = torch.Generator().manual_seed(seed)
    feats = [(t, t_pos, torch.randn(1, 64, 8, 8, generator=g).to(torch.bfloat16)) for t, t_pos in frames]
    if not n_ptr:
        return MemoryPlan(feats)
    return MemoryPlan(feats, torch.randn(1, 4 * n_ptr, 64, generator=g), torch.randn(1, 4 * n_ptr, 64, generator=g))


def test_speed_names():
    assert VideoSpeedConfig.resolve(None, "cpu") is None
    assert VideoSpeedConfig.resolve("faithful", "cpu") is None
    lossless = VideoSpeedConfig.resolve("lossless", "cpu")
    assert lossless.dtype is None and lossless.batch_objects and lossless.cache_keys
    auto = VideoSpeedConfig.resolve("auto", "cpu")
    assert auto.dtype == (torch.bfloat16 if native_bf16("cpu") else None)
    with pytest.raises(ValueError, match="speed must be one of"):
        VideoSpeedConfig.resolve("fast", "cpu")


def test_full_width_rope_equals_pairwise():
    x = torch.randn(2, 64, 16)
    cos, sin = axial_rope_tables(8, 8, 16)
    cos2, sin2 = rope_tables_full(8, 8, 16, 10000.0, "cpu")
    torch.testing.assert_close(rope(x, cos2, sin2), apply_rope(x, cos, sin), rtol=0, atol=1e-6)


@torch.inference_mode()
def test_batched_memory_attention_equals_faithful():
    """Objects with different memory layouts (grouped), pointers or none, cached keys reused: the same
    memory-conditioned features as the faithful module, object by object."""
    model = _small_model()
    features = model.encode_image(torch.randn(1, 3, 128, 128))
    plans = [_plan([(0, 0), (3, 5), (4, 6)], 3, 1), _plan([(0, 0), (2, 4), (4, 6)], 3, 2),
             _plan([(1, 0), (4, 6)], 0, 3), _plan([(0, 0), (1, 0), (3, 5), (4, 6)], 2, 4)]
    vision = features.vision
    curr = vision.flatten(2).transpose(1, 2)
    curr_pos = features.vision_pos.flatten(2).transpose(1, 2)
    want = []
    for plan in plans:
        memory, memory_pos, n_ptr = memory_tensors(model, plan, "cpu")
        want.append(model.memory_attention(curr, curr_pos, memory, memory_pos, n_ptr).transpose(1, 2).reshape(1, 256, 8, 8))
    want = torch.cat(want)
    runtime = VideoFastRuntime(model, VideoSpeedConfig(image_speed=None))
    cache = KeyCache()
    got = runtime.memory_attention(features, plans, cache)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(cache) == sum(len(p.frames) for p in plans)
    cache.end_frame()  # everything was read on this frame: kept
    assert len(cache) == sum(len(p.frames) for p in plans)
    again = runtime.memory_attention(features, plans[1:2], cache)  # keys from the cache
    torch.testing.assert_close(again, want[1:2], rtol=1e-4, atol=1e-4)
    cache.end_frame()  # keeps what the last frame read: the second object's memories
    assert len(cache) == len(plans[1].frames)
    unbatched = VideoFastRuntime(model, VideoSpeedConfig(image_speed=None, batch_objects=False, cache_keys=False))
    torch.testing.assert_close(unbatched.memory_attention(features, plans), want, rtol=1e-4, atol=1e-4)


def _out(seed: int) -> FrameOutput:
    g = torch.Generator().manual_seed(seed)
    return FrameOutput(pred_masks=torch.randn(1, 1, 8, 8, generator=g), obj_ptr=torch.randn(1, 16, generator=g),
                       object_score=torch.randn(1, 1, generator=g),
                       maskmem_features=torch.randn(1, 4, 4, 4, generator=g).to(torch.bfloat16))


def test_store_spills_pointers_exactly(tmp_path):
    spill = SpillDir(str(tmp_path))
    store = OutputStore(spill, keep_in_memory=2, pointers_in_memory=3)
    for t in range(12):
        store[t] = _out(t)
    assert len(store) == 12 and store.frames_in_memory == 2 and store.pointers_in_memory == 3
    for t in (0, 11, 5, 0):
        want, got = _out(t), store[t]
        assert torch.equal(got.obj_ptr, want.obj_ptr) and torch.equal(got.object_score, want.object_score)
        assert torch.equal(got.pred_masks, want.pred_masks)
        assert torch.equal(got.maskmem_features, want.maskmem_features)
    store[5] = _out(50)  # replaced: the new record, not the spilled one
    assert torch.equal(store[5].obj_ptr, _out(50).obj_ptr)
    odd = _out(7)
    store[20] = FrameOutput(odd.pred_masks, torch.randn(1, 8), odd.object_score, odd.maskmem_features)
    for t in range(21, 25):
        store[t] = _out(t)
    assert store[20].obj_ptr.shape == (1, 8)  # a record of another shape, spilled on its own
    del store[20]
    store.clear()
    assert len(store) == 0 and os.listdir(spill.path) == []
    spill.close()


def test_tracked_frames_is_a_small_dict():
    tracked = TrackedFrames(10)
    assert 3 not in tracked and len(tracked) == 0 and tracked.get(3) is None
    tracked[3] = True
    tracked[1] = False
    tracked[3] = True
    assert 3 in tracked and tracked[3] is True and tracked[1] is False and len(tracked) == 2
    assert list(tracked) == [1, 3]
    assert tracked.pop(3) is True and tracked.pop(3, None) is None and 3 not in tracked
    with pytest.raises(KeyError):
        tracked[4]
    assert -1 not in tracked and 10 not in tracked


# ------------------------------------------------------------------------------- golden scenarios
golden = pytest.mark.golden


@pytest.fixture(scope="module")
def sam2_manifest():
    from conftest import GOLDEN, _require

    return json.loads((_require(GOLDEN / "sam2") / "manifest.json").read_text())


def _predictor(speed):
    from conftest import GOLDEN

    import anyseg

    sam2 = GOLDEN / "sam2"
    return anyseg.build_sam2_video_predictor(str(sam2 / "sam2.1_golden.yaml"), str(sam2 / "sam2.1_golden.pt"),
                                             speed=speed)


@golden
def test_lossless_two_objects_forward_and_reverse(sam2_manifest):
    """Two objects tracked as one batch, forward then in reverse: the golden records within the
    golden tolerances. Then one object: the key cache holds at most what one frame reads."""
    from conftest import GOLDEN
    from test_sam2_golden_video import _run_scenario

    predictor = _predictor("lossless")
    assert predictor.speed is not None and predictor.speed.dtype is None
    scenario = next(s for s in sam2_manifest["video"]["scenarios"] if s["name"] == "b_two_objects_reverse")
    golden_data = np.load(GOLDEN / "sam2" / scenario["file"])
    _run_scenario(predictor, scenario, golden_data, sam2_manifest["tolerances"]["video"])

    state = predictor.init_state(str(GOLDEN / "sam2" / "clip"))
    predictor.add_new_points_or_box(state, 0, 1, points=[[288.0, 240.0]], labels=[1])
    for _ in predictor.propagate_in_video(state):
        # The conditioning frame and the last six memories.
        assert len(state.key_cache) <= predictor.model.config.num_maskmem
    state.close()
    assert len(state.key_cache) == 0


@golden
@pytest.mark.skipif(not (native_bf16("cpu") or os.environ.get("ANYSEG_TEST_FORCE_BF16")),
                    reason="this CPU has no native bfloat16 (AMX / AVX512-BF16); "
                           "set ANYSEG_TEST_FORCE_BF16=1 to check the quality with emulated bfloat16")
@pytest.mark.parametrize("name", ["a_points_forward", "b_two_objects_reverse"])
def test_bf16_memory_attention_quality(name, sam2_manifest):
    """``speed="auto"`` (bfloat16 memory attention): every object's mask on every yielded frame within
    IoU 0.98 of the faithful path's (the golden records)."""
    from conftest import GOLDEN, mask_iou, unpack_masks

    predictor = _predictor(VideoSpeedConfig(name="auto", dtype=torch.bfloat16, image_speed="auto"))
    scenario = next(s for s in sam2_manifest["video"]["scenarios"] if s["name"] == name)
    data = np.load(GOLDEN / "sam2" / scenario["file"])
    state = predictor.init_state(str(GOLDEN / "sam2" / "clip"))
    worst = 1.0
    try:
        for call in scenario["calls"]:
            args = dict(call["args"])
            if call["op"] == "propagate_in_video":
                got = [(f, m) for f, _, m in predictor.propagate_in_video(state, **args)]
            else:
                f, _, m = getattr(predictor, call["op"])(state, **args)
                got = [(f, m)]
            for (frame_idx, masks), rec in zip(got, call["records"]):
                assert frame_idx == rec["frame_idx"]
                want = unpack_masks(data[f"{rec['key']}_masks_packed"], data[f"{rec['key']}_masks_shape"])
                for i in range(want.shape[0]):
                    iou = mask_iou(masks[i, 0].numpy() > 0, want[i])
                    worst = min(worst, iou)
                    assert iou >= 0.98, f"{rec['key']}: object {rec['obj_ids'][i]} mask IoU {iou:.4f}"
    finally:
        state.close()
    print(f"{name}: worst mask IoU {worst:.4f}")
