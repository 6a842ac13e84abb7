"""Golden parity of the SAM 2 video predictor: every call of the five scenarios of
../shared/golden/sam2 (README "Video scenarios"), for SAM 2.1 and (scenarios a, b) SAM 2.0."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import GOLDEN, _require, mask_iou, unpack_masks

pytestmark = pytest.mark.golden

SAM2 = GOLDEN / "sam2"


@pytest.fixture(scope="module")
def sam2_manifest():
    return json.loads((_require(SAM2) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def predictor21():
    import anyseg

    return anyseg.build_sam2_video_predictor(str(_require(SAM2) / "sam2.1_golden.yaml"),
                                             str(SAM2 / "sam2.1_golden.pt"))


@pytest.fixture(scope="module")
def predictor20(tmp_path_factory, sam2_manifest):
    import torch

    import anyseg

    spec = sam2_manifest["sam2.0_video"]
    folder = tmp_path_factory.mktemp("sam20")
    sd = torch.load(_require(SAM2) / "sam2.1_golden.pt", weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in sd.items() if k not in spec["drop_keys"]}}, folder / "sam2.0_golden.pt")
    shutil.copy(SAM2 / spec["video_config"], folder / "sam2.0_golden.yaml")
    predictor = anyseg.build_sam2_video_predictor(str(folder / "sam2.0_golden.yaml"), str(folder / "sam2.0_golden.pt"))
    assert predictor.model.config.version == "2.0"
    return predictor


def _check_record(key, golden, obj_ids, want_ids, masks, tol):
    assert list(obj_ids) == list(want_ids), f"{key}: object ids {obj_ids} vs {want_ids}"
    masks = masks.detach().cpu().float().numpy()[:, 0]
    want_masks = unpack_masks(golden[f"{key}_masks_packed"], golden[f"{key}_masks_shape"])
    assert masks.shape == want_masks.shape, f"{key}: shape {masks.shape} vs {want_masks.shape}"
    for i in range(masks.shape[0]):
        iou = mask_iou(masks[i] > 0, want_masks[i])
        assert iou >= tol["mask_iou"], f"{key}: object {want_ids[i]} mask IoU {iou:.5f}"
    want = golden[f"{key}_logits_sampled"].astype(np.float32)
    got = masks[:, ::8, ::8]
    excess = np.abs(got - want) - (tol["logits_atol"] + tol["logits_rtol"] * np.abs(want))
    for i in range(got.shape[0]):
        frac = float((excess[i] > 0).mean())
        assert frac <= tol["logits_outlier_frac"], (
            f"{key}: object {want_ids[i]}: {frac:.4%} of sampled logits out of tolerance "
            f"(max abs diff {np.abs(got[i] - want[i]).max():.4g})")


def _run_scenario(predictor, scenario, golden, tol):
    state = predictor.init_state(str(SAM2 / "clip"))
    try:
        for call in scenario["calls"]:
            op, args = call["op"], dict(call["args"])
            records = call["records"]
            if op == "add_new_mask":
                key = args["mask"].split(" ")[0]
                args["mask"] = unpack_masks(golden[f"{key}_packed"], golden[f"{key}_shape"])
            if op == "propagate_in_video":
                got = list(predictor.propagate_in_video(state, **args))
                assert [g[0] for g in got] == [r["frame_idx"] for r in records], f"{op}: frames"
                for (frame_idx, obj_ids, masks), rec in zip(got, records):
                    _check_record(rec["key"], golden, obj_ids, rec["obj_ids"], masks, tol)
            elif op == "remove_object":
                obj_ids, updated = predictor.remove_object(state, **args)
                assert list(obj_ids) == call["returned_obj_ids"]
                assert [u[0] for u in updated] == [r["frame_idx"] for r in records]
                for (frame_idx, masks), rec in zip(updated, records):
                    _check_record(rec["key"], golden, obj_ids, rec["obj_ids"], masks, tol)
            elif op == "reset_state":
                assert predictor.reset_state(state) is None
                assert state["obj_ids"] == []
            else:
                frame_idx, obj_ids, masks = getattr(predictor, op)(state, **args)
                (rec,) = records
                assert frame_idx == rec["frame_idx"]
                _check_record(rec["key"], golden, obj_ids, rec["obj_ids"], masks, tol)
    finally:
        state.close()


SCENARIOS = ["a_points_forward", "b_two_objects_reverse", "c_mask_partial", "d_correct_clear_remove",
             "e_add_late_reset"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_video_scenario_sam21(name, sam2_manifest, predictor21):
    scenario = next(s for s in sam2_manifest["video"]["scenarios"] if s["name"] == name)
    golden = np.load(SAM2 / scenario["file"])
    _run_scenario(predictor21, scenario, golden, sam2_manifest["tolerances"]["video"])


@pytest.mark.parametrize("name", ["a_points_forward", "b_two_objects_reverse"])
def test_video_scenario_sam20(name, sam2_manifest, predictor20):
    scenario = next(s for s in sam2_manifest["sam2.0_video"]["scenarios"] if s["name"] == name)
    golden = np.load(SAM2 / scenario["file"])
    _run_scenario(predictor20, scenario, golden, sam2_manifest["tolerances"]["video"])


def test_spilled_outputs_give_the_same_results(sam2_manifest, tmp_path):
    """With one frame's outputs in memory per object, everything else goes through the spill directory
    and is read back; the results are still the reference's."""
    import anyseg

    predictor = anyseg.build_sam2_video_predictor(str(SAM2 / "sam2.1_golden.yaml"), str(SAM2 / "sam2.1_golden.pt"),
                                                  outputs_in_memory=1, spill_dir=str(tmp_path))
    scenario = next(s for s in sam2_manifest["video"]["scenarios"] if s["name"] == "a_points_forward")
    golden = np.load(SAM2 / scenario["file"])
    _run_scenario(predictor, scenario, golden, sam2_manifest["tolerances"]["video"])
    assert not any(tmp_path.iterdir()), "the spill directory is removed when the state is closed"
