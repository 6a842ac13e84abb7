"""HQ-SAM on every surface, with a tiny randomly initialised HQ model (128 px): the predictor protocol
(decode options, encoded-image caches keep the intermediate feature), segment-everything, the CLI
(``--hq-token-only``), the server engine, and the refusals for models without the HQ token."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anyseg import MaskGenerator, SamPredictor
from anyseg.checkpoint import save_model
from anyseg.cli import main
from anyseg.config import HQConfig, MaskDecoderConfig, SamConfig, ViTConfig
from anyseg.modeling.sam import build_sam
from anyseg.protocol import make_predictor


def _config(hq: bool) -> SamConfig:
    return SamConfig(encoder=ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(0,),
                                       window_size=4, img_size=128),
                     decoder=MaskDecoderConfig(depth=1, mlp_dim=64), hq=HQConfig(vit_dim=32) if hq else None)


@pytest.fixture(scope="module")
def hq_model():
    torch.manual_seed(0)
    model = build_sam(_config(True)).eval()
    with torch.no_grad():  # make the HQ path matter: LayerNorm2d weights off 1, a decisive HQ MLP
        for name, p in model.named_parameters():
            if "mask_decoder." in name and p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = np.zeros((96, 128, 3), np.uint8)
    img[20:70, 30:90] = (200, 60, 40)
    return np.clip(img.astype(int) + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)


POINT = dict(point_coords=np.array([[60.0, 45.0]]), point_labels=np.array([1]))


def test_one_mask_per_prompt_and_hq_token_only(hq_model, image):
    predictor = SamPredictor(hq_model)
    predictor.set_image(image)
    assert predictor.interm_features.shape == (1, 8, 8, 32)
    masks, scores, low = predictor.predict(**POINT)
    assert masks.shape == (1, 96, 128) and scores.shape == (1,) and low.shape == (1, 32, 32)
    hq_masks, hq_scores, hq_low = predictor.predict(**POINT, hq_token_only=True)
    assert hq_scores == pytest.approx(scores)  # the selected SAM token's score in both modes
    assert not np.allclose(low, hq_low)
    # The combined logits are the selected SAM mask plus the HQ mask.
    with torch.inference_mode():
        sparse, dense = hq_model.embed_prompts(points=(torch.tensor([[[60.0, 45.0]]]), torch.tensor([[1]])))
        sam, hq, iou = hq_model.mask_decoder.predict_all(predictor.features, hq_model.prompt_encoder.get_dense_pe(),
                                                        sparse, dense, predictor.hq_features())
    best = int(torch.argmax(iou[0, 1:])) + 1
    np.testing.assert_allclose(low[0], (sam[0, best] + hq[0, 0]).numpy(), atol=1e-5)
    np.testing.assert_allclose(hq_low[0], hq[0, 0].numpy(), atol=1e-5)
    assert scores[0] == pytest.approx(float(iou[0, best]))


def test_protocol_decode_and_encoded_cache(hq_model, image):
    direct = SamPredictor(hq_model)
    direct.set_image(image)
    want = direct.predict(**POINT, hq_token_only=True)
    surface = make_predictor(hq_model)
    surface.set_image(image)
    encoded = surface.encoded()
    assert len(encoded.state) == 1 and encoded.state[0].shape == (1, 8, 8, 32)
    restored = make_predictor(hq_model)
    restored.set_encoded(encoded)
    got = restored.decode(POINT["point_coords"], POINT["point_labels"], hq_token_only=True)
    np.testing.assert_allclose(got.low_res_logits, want[2], atol=1e-5)
    batch = restored.decode_batch(boxes=np.array([[10.0, 10.0, 100.0, 80.0]]), multimask_output=True,
                                  hq_token_only=True)
    assert batch.masks.shape[:2] == (1, 1)
    with pytest.raises(TypeError, match="use_m2m"):
        restored.decode(POINT["point_coords"], POINT["point_labels"], use_m2m=True)


def test_models_without_hq_token_refuse_it(image):
    torch.manual_seed(0)
    plain = build_sam(_config(False)).eval()
    surface = make_predictor(plain)
    surface.set_image(image)
    assert surface.encoded().state == ()
    with pytest.raises(ValueError, match="HQ-SAM"):
        surface.decode(POINT["point_coords"], POINT["point_labels"], hq_token_only=True)
    surface.decode(POINT["point_coords"], POINT["point_labels"], hq_token_only=False)  # the default is fine
    with pytest.raises(ValueError, match="HQ-SAM"):
        MaskGenerator(plain, points_per_side=2, hq_token_only=True)


@pytest.mark.parametrize("hq_token_only", [False, True])
def test_segment_everything_gives_one_record_per_point(hq_model, image, hq_token_only):
    generator = MaskGenerator(hq_model, points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              box_nms_thresh=1.0, output_mode="binary_mask", hq_token_only=hq_token_only)
    records = generator.generate(image)
    assert len(records) == 9
    assert len({tuple(r["point_coords"][0]) for r in records}) == 9
    predictor = SamPredictor(hq_model)
    predictor.set_image(image)
    record = records[0]
    masks, scores, _ = predictor.predict(point_coords=np.array(record["point_coords"]), point_labels=np.array([1]),
                                         hq_token_only=hq_token_only)
    assert record["predicted_iou"] == pytest.approx(float(scores[0]), abs=1e-5)


def test_cli_hq_token_only(hq_model, image, tmp_path):
    from PIL import Image

    ckpt = save_model(hq_model, tmp_path / "tiny_hq.pth")
    Image.fromarray(image).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    status = main(["segment", str(tmp_path / "scene.png"), "--point", "60,45", "--hq-token-only",
                   "--model", str(ckpt), "-o", str(out)])
    assert status == 0
    record = json.loads((out / "scene.json").read_text())
    predictor = SamPredictor(hq_model)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(**POINT, hq_token_only=True)
    assert record["masks"][0]["area"] == int(masks[0].sum())
    assert record["masks"][0]["score"] == pytest.approx(float(scores[0]), abs=1e-5)

    status = main(["auto", str(tmp_path / "scene.png"), "--hq-token-only", "--points-per-side", "2",
                   "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--box-nms-thresh", "1",
                   "--no-progress", "--model", str(ckpt), "-o", str(tmp_path / "auto")])
    assert status == 0

    torch.manual_seed(0)
    plain = save_model(build_sam(_config(False)), tmp_path / "tiny_plain.pth")
    assert main(["segment", str(tmp_path / "scene.png"), "--point", "60,45", "--hq-token-only",
                 "--model", str(plain), "-o", str(tmp_path / "plain")]) == 2


def test_server_engine_decode(hq_model, image):
    import io

    from PIL import Image

    from anyseg.server.cache import EmbeddingCache
    from anyseg.server.engine import Engine

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    engine = Engine(hq_model, EmbeddingCache(64 << 20), max_pixels=1 << 20)
    try:
        entry, _ = engine.encode_bytes(buffer.getvalue())
        assert len(entry.state) == 1  # the intermediate feature is cached with the embedding
        masks, scores, low = engine.decode(entry, POINT["point_coords"], POINT["point_labels"], None, None, True,
                                           hq_token_only=True)
        predictor = SamPredictor(hq_model)
        predictor.set_image(image)
        want = predictor.predict(**POINT, hq_token_only=True)
        assert masks.shape == (1, 96, 128)
        np.testing.assert_allclose(low, want[2], atol=1e-5)
    finally:
        engine.close()


def test_dropin_names_of_segment_anything_hq(tmp_path):
    from anyseg import sam_hq_model_registry, sam_model_registry
    from anyseg.dropin import build_sam_hq_vit_tiny

    assert set(sam_hq_model_registry) == {"default", "vit_h", "vit_l", "vit_b", "vit_tiny"}
    assert sam_model_registry["vit_tiny"] is sam_hq_model_registry["vit_tiny"] is build_sam_hq_vit_tiny
    tiny = build_sam_hq_vit_tiny()
    assert tiny.is_hq and tiny.config.hq.vit_dim == 160
    # A checkpoint decides what is built.
    torch.manual_seed(0)
    ckpt = save_model(build_sam(_config(True)), tmp_path / "hq.pth")
    with pytest.warns(UserWarning, match="not hq_vit_b"):  # the tiny test encoder is not ViT-B: it says so
        model = sam_hq_model_registry["vit_b"](checkpoint=ckpt)
    assert model.is_hq


@pytest.mark.parametrize("preset", ["lossless", "auto"])
def test_fast_presets_fall_back_to_the_faithful_hq_decoder(hq_model, image, preset):
    """The fast decoder has no HQ token: HQ models decode on the faithful path under every preset (the
    encoder runs faithfully too, as it must hand over its intermediate feature), so results stay within
    the golden tolerances of the faithful path."""
    import copy

    from anyseg.speed import apply, resolve

    faithful = SamPredictor(hq_model)
    faithful.set_image(image)
    fast_model = copy.deepcopy(hq_model)
    apply(fast_model, resolve(preset, fast_model.device))
    fast = SamPredictor(fast_model)
    fast.set_image(image)
    for hq_token_only in (False, True):
        want = faithful.predict(**POINT, hq_token_only=hq_token_only)
        got = fast.predict(**POINT, hq_token_only=hq_token_only)
        assert got[0].shape == want[0].shape == (1, 96, 128)
        np.testing.assert_allclose(got[2], want[2], atol=1e-2, rtol=2e-3)
        np.testing.assert_allclose(got[1], want[1], atol=1e-3)
        inter, union = np.logical_and(got[0], want[0]).sum(), np.logical_or(got[0], want[0]).sum()
        assert union == 0 or inter / union >= 0.999
    generator = MaskGenerator(fast_model, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              box_nms_thresh=1.0)
    assert len(generator.generate(image)) == 4
