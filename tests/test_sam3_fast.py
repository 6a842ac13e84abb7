"""SAM 3's speed presets: ``faithful`` / ``lossless`` keep the reference computation (fused attention),
a reduced-precision preset runs the ViT trunk in that dtype. The bfloat16 trunk is held to the quality bar
of docs/speed.md against the golden reference outputs: every detection scored clearly above the threshold
(by more than 0.01) is found with mask IoU >= 0.98 and its score within 0.01, both ways."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GOLDEN, IMAGES, _require, mask_iou, unpack_masks

SAM3 = GOLDEN / "sam3"
MARGIN = 0.01  # detections this close to the threshold may fall on either side of it


def _native_bf16() -> bool:
    from anyseg.speed import cpu_capabilities

    return cpu_capabilities()["bf16_matmul"]


@pytest.fixture(scope="module")
def sam3_model():
    import anyseg

    return anyseg.load_model(_require(SAM3) / "sam3_checkpoint.pt")


def test_presets_set_the_trunk_dtype(sam3_model):
    from anyseg.protocol import apply_speed
    from anyseg.speed import SpeedConfig

    try:
        for speed in ("faithful", "lossless", SpeedConfig.lossless(int8_encoder=True)):
            apply_speed(sam3_model, speed)
            assert sam3_model.trunk_dtype is None, speed
        apply_speed(sam3_model, "auto")
        assert sam3_model.trunk_dtype == (torch.bfloat16 if _native_bf16() else None)
        apply_speed(sam3_model, SpeedConfig.lossless(encoder_dtype=torch.bfloat16))
        assert sam3_model.trunk_dtype == torch.bfloat16
    finally:
        apply_speed(sam3_model, "faithful")


def test_load_model_applies_the_preset():
    import anyseg

    path = _require(SAM3) / "sam3_checkpoint.pt"
    assert anyseg.load_model(path, speed="lossless").trunk_dtype is None
    assert anyseg.load_model(path, speed="auto").trunk_dtype == (torch.bfloat16 if _native_bf16() else None)


def test_bf16_trunk_runs_the_trunk_in_bf16_and_the_rest_in_float32(sam3_model):
    x = torch.randn(1, 3, sam3_model.image_size, sam3_model.image_size)
    seen = []
    trunk = sam3_model.backbone.vision_backbone.trunk
    linear = next(m for m in trunk.modules() if isinstance(m, torch.nn.Linear))  # the trunk's products
    hook = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        sam3_model.trunk_dtype = torch.bfloat16
        with torch.inference_mode():
            features = sam3_model.encode_image(x)
    finally:
        hook.remove()
        sam3_model.trunk_dtype = None
    assert seen and set(seen) == {torch.bfloat16}
    assert all(f.dtype == torch.float32 for f in features.fpn)


def _matched(a_scores, a_masks, b_scores, b_masks, threshold):
    """Each detection of ``a`` scored above threshold + MARGIN has one in ``b`` with mask IoU >= 0.98 and
    a score within MARGIN; returns the worst IoU seen."""
    worst = 1.0
    for score, mask in zip(a_scores, a_masks):
        if score < threshold + MARGIN:
            continue
        ious = [mask_iou(mask[0], other[0]) for other in b_masks]
        assert ious, f"a detection scored {score:.3f} is missing"
        j = int(np.argmax(ious))
        assert ious[j] >= 0.98 and abs(b_scores[j] - score) <= MARGIN, (score, ious[j], b_scores[j])
        worst = min(worst, ious[j])
    return worst


@pytest.mark.golden
@pytest.mark.skipif(not (_native_bf16() or os.environ.get("ANYSEG_TEST_BF16") == "1"),
                    reason="this CPU has no native bfloat16 (AMX / AVX512-BF16); ANYSEG_TEST_BF16=1 forces it")
def test_bf16_trunk_keeps_quality_bar(sam3_model):
    from anyseg import Sam3Processor
    from anyseg.protocol import apply_speed
    from anyseg.speed import SpeedConfig

    manifest = json.loads((_require(SAM3) / "manifest.json").read_text())
    apply_speed(sam3_model, SpeedConfig.lossless(encoder_dtype=torch.bfloat16))
    try:
        for entry in manifest["images"]:
            golden = np.load(_require(SAM3) / entry["file"])
            processor = Sam3Processor(sam3_model, resolution=1008, confidence_threshold=0.5)
            state = processor.set_image(Image.open(_require(IMAGES) / entry["image"]))
            for case in entry["cases"]:
                processor.replay(case["calls"], state)
                name = case["name"]
                want_scores = golden[f"{name}_scores"]
                want_masks = unpack_masks(golden[f"{name}_masks_packed"], golden[f"{name}_masks_shape"])
                got_scores, got_masks = state["scores"].numpy(), state["masks"].numpy()
                _matched(want_scores, want_masks, got_scores, got_masks, 0.5)
                _matched(got_scores, got_masks, want_scores, want_masks, 0.5)
    finally:
        apply_speed(sam3_model, "faithful")
