"""PerSAM one-shot personalization: each step, the decoder hooks on SAM 1 and SAM 2, and the pipeline
against a fixed-centre click on generated scenes with the built-in model."""
from dataclasses import replace
import json

import numpy as np
import pytest
import torch
from PIL import Image

from anyseg import load_model, make_predictor
from anyseg.beyond.demo import persam_scenes
from anyseg.beyond.personalize import (PerSAM, attention_bias, confidence_map, guided_decoder, location_prior,
                                       mask_to_grid, target_embedding)


@pytest.fixture(scope="module")
def predictor():
    return make_predictor(load_model("nano"))


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_target_embedding_is_the_masked_mean():
    emb = np.random.default_rng(0).normal(size=(4, 3, 3)).astype(np.float32)
    cov = np.zeros((3, 3))
    cov[0, 0], cov[1, 2], cov[2, 2] = 1.0, 0.8, 0.3  # the last is below half coverage: left out
    np.testing.assert_allclose(target_embedding(emb, cov), (emb[:, 0, 0] + emb[:, 1, 2]) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        target_embedding(emb, np.zeros((3, 3)))


def test_confidence_and_location_prior():
    emb = np.zeros((2, 2, 3), np.float32)
    emb[0] = 1.0
    emb[1, 1, 2] = 5.0  # one location points elsewhere
    conf = confidence_map(emb, np.array([1.0, 0.0]))
    assert conf.shape == (2, 3) and conf[1, 2] < 0.3 and np.allclose(np.delete(conf.ravel(), 5), 1)
    big = np.zeros((10, 20))
    big[7, 15], big[2, 3] = 1.0, -1.0
    coords, labels = location_prior(big)
    np.testing.assert_array_equal(coords, [[15, 7], [3, 2]])  # XY: best positive, worst negative
    np.testing.assert_array_equal(labels, [1, 0])
    bias = attention_bias(np.array([[0.0, 1.0], [2.0, 3.0]]), alpha=2.0)
    assert bias.shape == (4,) and np.all(np.diff(bias) > 0) and 0 < bias.min() and bias.max() < 2


def test_mask_to_grid_follows_the_model_frame(predictor):
    image = np.zeros((64, 128, 3), np.uint8)  # wide: SAM 1 pads the bottom half of its square
    predictor.set_image(image)
    grid = mask_to_grid(np.ones((64, 128), bool), predictor)
    g = predictor.embedding_shape[-1]
    assert grid.shape == (g, g)
    assert grid[: g // 2].min() > 0.99 and grid[g // 2 :].max() < 0.01


def _decode_logits(p, coords, labels):
    return p.decode(coords, labels, multimask_output=True, return_logits=True).masks


def _sam2_small():
    from anyseg.config_sam2 import HieraConfig, NeckConfig, sam2_config
    from anyseg.modeling.sam2 import build_sam2_model

    trunk = HieraConfig(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,))
    config = replace(sam2_config("t"), trunk=trunk, neck=NeckConfig(backbone_channel_list=trunk.channel_list))
    torch.manual_seed(0)
    return build_sam2_model(config).eval()


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_guided_decoder_changes_the_decode_and_restores_it(family, predictor):
    p = predictor if family == "sam" else make_predictor(_sam2_small())
    rng = np.random.default_rng(1)
    p.set_image((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    coords, labels = np.array([[20.0, 20.0], [50.0, 40.0]]), np.array([1, 0])
    plain = _decode_logits(p, coords, labels)
    g = p.embedding_shape[-1]
    with guided_decoder(p.model, bias=np.zeros(g * g)):  # a zero bias is the plain attention
        np.testing.assert_allclose(_decode_logits(p, coords, labels), plain, atol=1e-5)
    bias = np.zeros(g * g, np.float32)
    bias[: g * g // 4] = 4.0
    with guided_decoder(p.model, bias=bias):
        guided = _decode_logits(p, coords, labels)
    assert np.abs(guided - plain).max() > 1e-3  # the random SAM 2 decoder answers small logits
    target = rng.normal(size=p.embedding_shape[1]).astype(np.float32)
    with guided_decoder(p.model, target=target):
        semantic = _decode_logits(p, coords, labels)
    assert np.abs(semantic - plain).max() > 1e-3
    np.testing.assert_array_equal(_decode_logits(p, coords, labels), plain)  # hooks gone afterwards
    with pytest.raises(ValueError, match="locations"):
        with guided_decoder(p.model, bias=np.zeros(7)):
            _decode_logits(p, coords, labels)


def test_guided_decoder_switches_off_the_fast_decoder(predictor):
    from anyseg.speed import SpeedConfig, apply

    model = load_model("nano")
    apply(model, SpeedConfig(fast_decoder=True))
    with guided_decoder(model, bias=np.zeros(4)):
        assert model.speed_config.fast_decoder is False
    assert model.speed_config.fast_decoder is True


def test_persam_beats_a_centre_click(predictor):
    """The personal object re-appears at other places and scales, a distractor sits at the centre: PerSAM's
    mean IoU must beat a click at the image centre by at least 0.4 (measured: about 0.9 against 0.03)."""
    (ref, ref_mask), targets = persam_scenes(4, seed=1)
    persam = PerSAM(predictor)
    persam.set_reference(ref, ref_mask)
    ours, centre = [], []
    for image, truth in targets:
        result = persam.segment(image)
        assert len(result.stages) == 3 and result.mask.shape == truth.shape
        ours.append(_iou(result.mask, truth))
        d = predictor.decode(np.array([[image.shape[1] / 2, image.shape[0] / 2]]), np.array([1]))
        centre.append(_iou(d.masks[int(np.argmax(d.scores))], truth))
    assert np.mean(ours) >= np.mean(centre) + 0.4, (ours, centre)
    assert np.mean(ours) > 0.7


def test_persam_input_errors(predictor):
    persam = PerSAM(predictor)
    with pytest.raises(ValueError, match="set_reference"):
        persam.segment(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        persam.set_reference(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="32 x 32"):
        persam.set_reference(np.zeros((32, 32, 3), np.uint8), np.ones((16, 16), bool))
    with pytest.raises(ValueError, match="refine"):
        PerSAM(predictor, refine=3)


def test_personalize_cli(tmp_path):
    from anyseg.cli import main

    (ref, ref_mask), targets = persam_scenes(1, seed=1)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    Image.fromarray(ref_mask.astype(np.uint8) * 255).save(tmp_path / "ref_mask.png")
    Image.fromarray(targets[0][0]).save(tmp_path / "t1.png")
    out = tmp_path / "out"
    assert main(["personalize", "--ref", str(tmp_path / "ref.png"), "--ref-mask", str(tmp_path / "ref_mask.png"),
                 str(tmp_path / "t1.png"), "-o", str(out)]) == 0
    mask = np.asarray(Image.open(out / "t1_mask.png")) > 0
    assert _iou(mask, targets[0][1]) > 0.6
    record = json.loads((out / "personalize.json").read_text())
    assert record["targets"][0]["area"] == int(mask.sum()) and record["targets"][0]["point_labels"] == [1, 0]
    assert main(["personalize", "--ref", str(tmp_path / "nope.png"), "--ref-mask", str(tmp_path / "ref_mask.png"),
                 str(tmp_path / "t1.png"), "-o", str(out)]) == 2
