"""Golden parity of the SAM 3 image detector (../shared/golden/sam3, README): every case of both images,
every intermediate the README lists, and the tokenizer table, within the README's tolerances.

The model and each image's runs are shared through module-scoped fixtures: one ``set_image`` per image,
then the five cases in the README's order, each after ``reset_all_prompts``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GOLDEN, IMAGES, _require, mask_iou, unpack_masks

pytestmark = pytest.mark.golden

SAM3 = GOLDEN / "sam3"
CASE_FIELDS = ("pred_logits", "pred_boxes", "presence_logit", "presence_per_layer", "queries", "geo_feats",
               "language_features", "language_mask", "semantic_seg")


@pytest.fixture(scope="module")
def sam3_manifest():
    return json.loads((_require(SAM3) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def sam3_model():
    import anyseg

    torch.manual_seed(0)
    return anyseg.load_model(_require(SAM3) / "sam3_checkpoint.pt")


def _close(got, want, atol, what):
    got = np.asarray(got, dtype=np.float32)
    want = np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    diff = np.abs(got - want).max() if got.size else 0.0
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


def _run_image(model, entry):
    """Everything the tests compare for one image: image-level tensors and each case's outputs."""
    from anyseg import Sam3Processor
    from anyseg.sam3_processor import preprocess_image

    rgb = np.array(Image.open(_require(IMAGES) / entry["image"]).convert("RGB"))
    processor = Sam3Processor(model, resolution=1008, confidence_threshold=0.5)
    with torch.inference_mode():
        x = preprocess_image(rgb, 1008)
        trunk = model.backbone.vision_backbone.trunk(x)
    resized = torch.nn.functional.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None], size=(1008, 1008),
                                              mode="bilinear", antialias=True)
    state = processor.set_image(Image.open(_require(IMAGES) / entry["image"]))
    feats = state["backbone_out"]
    out = {"image": {"resized_uint8_crop": resized[0, :, 300:556, 300:556].numpy(), "trunk_out": trunk.numpy(),
                     "vision_features": feats.fpn[2].numpy(), "fpn0_crop": feats.fpn[0][:, :, :48, :48].numpy(),
                     "fpn1_crop": feats.fpn[1][:, :, :48, :48].numpy(), "vision_pos_enc_2": feats.pos[2].numpy()},
           "hw": (state["original_height"], state["original_width"])}
    with pytest.raises(ValueError, match="unknown prompt call 'set_mask'"):
        processor.replay([("set_mask", None)], state)
    for case in entry["cases"]:
        processor.replay(case["calls"], state)
        det = state["detections"]
        result = processor.result(state)
        out[case["name"]] = {
            "scores": state["scores"].numpy(), "boxes": state["boxes"].numpy(), "masks": state["masks"].numpy(),
            "typed": result,
            "pred_logits": det.pred_logits[0].numpy(), "pred_boxes": det.pred_boxes[0].numpy(),
            "presence_logit": det.presence_logit[0].numpy(), "presence_per_layer": det.presence_per_layer[0].numpy(),
            "queries": det.queries[0].numpy(), "geo_feats": det.prompt.geometry[0].numpy(),
            "language_features": det.prompt.tokens[0, :32].numpy(), "language_mask": det.prompt.mask[0, :32].numpy(),
            "semantic_seg": det.semantic_seg[0, 0].numpy(), "pred_masks": det.pred_masks[0],
            "encoder_hidden_states": det.encoder_hidden_states[0].numpy(),
        }
    return out


@pytest.fixture(scope="module", params=["groceries", "truck"])
def image_run(request, sam3_model, sam3_manifest):
    entry = next(e for e in sam3_manifest["images"] if e["image"].startswith(request.param))
    golden = np.load(_require(SAM3) / entry["file"])
    return entry, golden, _run_image(sam3_model, entry)


def test_config_is_the_manifest_one(sam3_model, sam3_manifest):
    want = sam3_manifest["config"]
    c = sam3_model.config
    assert (c.vit.embed_dim, c.vit.depth, c.vit.num_heads, c.vit.window_size) == (
        want["vit"]["embed_dim"], want["vit"]["depth"], want["vit"]["num_heads"], want["vit"]["window_size"])
    assert list(c.vit.global_att_blocks) == want["vit"]["global_att_blocks"]
    assert (c.d_model, c.num_heads, c.ffn_dim, c.num_queries) == (
        want["d_model"], want["num_heads"], want["ffn"], want["num_queries"])
    assert (c.text.width, c.text.heads, c.text.layers, c.text.context_length, c.text.vocab_size) == (
        want["text"]["width"], want["text"]["heads"], want["text"]["layers"], want["text"]["context_length"],
        want["text"]["vocab_size"])
    assert (c.encoder_layers, c.decoder_layers, c.geometry_layers) == (
        want["encoder_layers"], want["decoder_layers"], want["geometry_layers"])
    assert c.image_size == want["image_size"] and list(c.neck_scales) == want["neck_scale_factors"]


def test_image_intermediates(image_run):
    _, golden, run = image_run
    img = run["image"]
    np.testing.assert_array_equal(img["resized_uint8_crop"], golden["resized_uint8_crop"])
    _close(img["trunk_out"], golden["trunk_out"], 5e-2, "trunk_out")
    _close(img["vision_features"], golden["vision_features"], 2e-2, "vision_features")
    _close(img["fpn0_crop"], golden["fpn0_crop"], 1e-2, "fpn0_crop")
    _close(img["fpn1_crop"], golden["fpn1_crop"], 1e-2, "fpn1_crop")
    _close(img["vision_pos_enc_2"], golden["vision_pos_enc_2"], 2e-3, "vision_pos_enc_2")


def test_detections(image_run):
    """Count and order, scores (2e-3), boxes in original pixels (1 px), every mask IoU >= 0.999."""
    entry, golden, run = image_run
    h, w = run["hw"]
    assert (h, w) == tuple(entry["image_hw"])
    for case in entry["cases"]:
        name, got = case["name"], run[case["name"]]
        want_scores = golden[f"{name}_scores"]
        assert len(got["scores"]) == len(want_scores) == case["n_detections"], name
        _close(got["scores"], want_scores, 2e-3, f"{name} scores")
        _close(got["boxes"], golden[f"{name}_boxes"].reshape(-1, 4), 1.0, f"{name} boxes")
        want_masks = unpack_masks(golden[f"{name}_masks_packed"], golden[f"{name}_masks_shape"])
        assert got["masks"].shape == want_masks.shape == (len(want_scores), 1, h, w), name
        for i, (a, b) in enumerate(zip(got["masks"], want_masks)):
            assert mask_iou(a[0], b[0]) >= 0.999, f"{name} mask {i}"
        typed = got["typed"]
        assert len(typed) == len(want_scores)
        assert typed.masks.shape == (len(want_scores), h, w) and typed.masks.dtype == bool
        np.testing.assert_array_equal(typed.masks, got["masks"][:, 0])


def test_case_intermediates(image_run):
    entry, golden, run = image_run
    tolerances = {"pred_logits": 2e-2, "pred_boxes": 1e-3, "presence_logit": 3e-2, "presence_per_layer": 3e-2,
                  "queries": 1e-2, "geo_feats": 1e-2, "language_features": 1e-5, "semantic_seg": 2e-2}
    for case in entry["cases"]:
        name, got = case["name"], run[case["name"]]
        for field, atol in tolerances.items():
            _close(got[field], golden[f"{name}_{field}"], atol, f"{name} {field}")
        np.testing.assert_array_equal(got["language_mask"], golden[f"{name}_language_mask"])
        idx = golden[f"{name}_top2_idx"]
        _close(got["pred_masks"][torch.as_tensor(idx)].numpy(), golden[f"{name}_top2_mask_logits"], 0.2,
               f"{name} top2_mask_logits")
    _close(run["text_a"]["encoder_hidden_states"], golden["text_a_encoder_hidden_states"], 5e-2,
           "text_a encoder_hidden_states")


def test_presence_decides_phrase_b(image_run):
    """Phrase B is absent from both images: its presence logit is at most -4 (within the presence
    tolerance) and nothing is returned."""
    _, golden, run = image_run
    assert run["text_b"]["presence_logit"][0] <= -4 + 3e-2
    assert len(run["text_b"]["scores"]) == 0 and run["text_b"]["masks"].shape[0] == 0


def test_tokenizer_table(sam3_manifest):
    from anyseg.sam3_tokenizer import get_tokenizer

    tok = get_tokenizer()
    table = sam3_manifest["tokenizer"]
    for case in table["cases"]:
        assert tok(case["text"], table["context_length"])[0].tolist() == case["ids"], case["text"]
    for case in table["cases_77"]:
        assert tok(case["text"], 77)[0].tolist() == case["ids"], case["text"]
