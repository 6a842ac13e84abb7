"""SamPredictor input handling: every malformed input is a ValueError saying what was wrong, and the
accepted forms of an image (array RGB / BGR, grayscale, PIL, path) encode identically."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import anyseg
from anyseg import ImageNotSetError, SamPredictor
from anyseg.config import SamConfig, ViTConfig
from anyseg.modeling.sam import build_sam

H, W = 64, 96
POINT = np.array([[40.0, 30.0]])
LABEL = np.array([1])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model(golden_dir, manifest):
    return anyseg.load_model(golden_dir / manifest["vit_small"]["checkpoint"])


@pytest.fixture(scope="module")
def predictor(model, image) -> SamPredictor:
    """The golden vit_small model with one small image set (the encoder still runs at 1024)."""
    predictor = SamPredictor(model)
    predictor.set_image(image)
    return predictor


@pytest.fixture(scope="module")
def small_predictor() -> SamPredictor:
    """A small randomly initialised SAM at 256 px input, for the tests that encode several images.

    Whether two inputs give the same embedding depends only on the predictor's image handling,
    not on the weights, and this model encodes in milliseconds.
    """
    torch.manual_seed(0)
    config = SamConfig(encoder=ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                                         window_size=4, img_size=256))
    model = build_sam(config).eval()
    with torch.no_grad():  # non-zero position terms, so that every pixel position matters
        for name, param in model.image_encoder.named_parameters():
            if "pos" in name:
                param.normal_(0.0, 0.5)
    return SamPredictor(model)


def _embedding(predictor: SamPredictor, source, **kwargs) -> torch.Tensor:
    predictor.set_image(source, **kwargs)
    return predictor.get_image_embedding().clone()


# ------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("bad, match", [
    (np.zeros((3, H, W), dtype=np.uint8), "transposed"),          # channels first
    (np.zeros((H, W, 2), dtype=np.uint8), r"HxWx3"),
    (np.zeros((1, H, W, 3), dtype=np.uint8), r"got shape \(1, 64, 96, 3\)"),
    (np.zeros((0, W, 3), dtype=np.uint8), "empty"),
    (np.zeros((H, W, 3), dtype=np.int32), "unsupported image array dtype int32"),
    (np.full((H, W, 3), 200.0, dtype=np.float32), r"\[0, 1\]"),
    (np.full((H, W, 3), np.nan, dtype=np.float32), "NaN"),
])
def test_set_image_rejects_bad_arrays(predictor, bad, match):
    before = predictor.get_image_embedding()
    with pytest.raises(ValueError, match=match):
        predictor.set_image(bad)
    # a rejected image leaves the current one in place
    assert predictor.is_image_set and predictor.get_image_embedding() is before
    assert predictor.original_size == (H, W)


@pytest.mark.parametrize("fmt", ["rgb", "BGRA", "HSV", ""])
def test_set_image_rejects_image_format(predictor, image, fmt):
    with pytest.raises(ValueError, match="image_format must be 'RGB' or 'BGR'"):
        predictor.set_image(image, image_format=fmt)


def test_set_image_rejects_empty_and_corrupt_files(predictor, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        predictor.set_image(empty)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    with pytest.raises(ValueError, match="could not decode") as info:
        predictor.set_image(str(corrupt))
    assert "corrupt.png" in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        predictor.set_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="directory"):
        predictor.set_image(tmp_path)
    assert predictor.is_image_set


def test_set_image_state(predictor):
    assert predictor.is_image_set
    assert predictor.original_size == (H, W)
    assert predictor.input_size == (683, 1024)
    assert tuple(predictor.get_image_embedding().shape) == (1, 256, 64, 64)


def test_bgr_is_reversed_rgb(small_predictor, image):
    rgb = _embedding(small_predictor, image)
    assert torch.equal(_embedding(small_predictor, np.ascontiguousarray(image[..., ::-1]), image_format="BGR"), rgb)
    # the channel order matters: the same array read as BGR is another image
    assert not torch.allclose(_embedding(small_predictor, image, image_format="BGR"), rgb)


def test_pil_image_and_path_match_array(small_predictor, image, tmp_path):
    want = _embedding(small_predictor, image)
    assert torch.equal(_embedding(small_predictor, Image.fromarray(image)), want)
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    assert torch.equal(_embedding(small_predictor, path), want)
    assert torch.equal(_embedding(small_predictor, str(path)), want)
    assert small_predictor.original_size == (H, W)


def test_grayscale_image(small_predictor, image):
    gray = image[..., 0]
    want = _embedding(small_predictor, np.repeat(gray[..., None], 3, axis=2))
    assert torch.equal(_embedding(small_predictor, gray), want)
    assert torch.equal(_embedding(small_predictor, gray[..., None]), want)
    assert torch.equal(_embedding(small_predictor, Image.fromarray(gray, mode="L")), want)
    masks, scores, _ = small_predictor.predict(POINT, LABEL, multimask_output=False)
    assert masks.shape == (1, H, W) and scores.shape == (1,)


def test_reset_image(small_predictor, image):
    small_predictor.set_image(image)
    small_predictor.predict(POINT, LABEL)
    small_predictor.reset_image()
    assert not small_predictor.is_image_set
    with pytest.raises(ImageNotSetError, match="set_image"):
        small_predictor.predict(POINT, LABEL)
    with pytest.raises(ImageNotSetError):
        small_predictor.get_image_embedding()
    with pytest.raises(ImageNotSetError):
        small_predictor.predict_batch(boxes=np.array([[0, 0, 10, 10]]))


def test_predict_before_set_image(model):
    fresh = SamPredictor(model)
    assert issubclass(ImageNotSetError, ValueError)
    with pytest.raises(ValueError, match=r"set_image\(\.\.\.\) before predicting"):
        fresh.predict(POINT, LABEL)
    with pytest.raises(ImageNotSetError):
        fresh.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1))
    with pytest.raises(ImageNotSetError):
        fresh.get_image_embedding()


# ------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("kwargs, match", [
    (dict(point_coords=[[np.nan, 3.0]], point_labels=[1]), "NaN or infinite"),
    (dict(point_coords=[[1.0, np.inf]], point_labels=[1]), "NaN or infinite"),
    (dict(point_coords=[[1.0, 2.0]], point_labels=[2]), r"must be 0 \(background\) or 1 \(foreground\)"),
    (dict(point_coords=[[1.0, 2.0], [3.0, 4.0]], point_labels=[1, -1]), "0 .*or 1"),
    (dict(point_coords=[[1.0, 2.0]]), "must come with point_labels"),
    (dict(point_labels=[1]), "without point_coords"),
    (dict(point_coords=[[1.0, 2.0], [3.0, 4.0]], point_labels=[1]), "expected 2 point_labels"),
    (dict(point_coords=[[1.0, 2.0]], point_labels=[1, 0]), "expected 1 point_labels"),
    (dict(point_coords=[[1.0, 2.0, 3.0]], point_labels=[1]), "point_coords of shape N x 2"),
    (dict(box=[50.0, 10.0, 20.0, 40.0]), "X1 >= X0"),
    (dict(box=[10.0, 40.0, 50.0, 20.0]), "Y1 >= Y0"),
    (dict(box=[10.0, np.nan, 50.0, 20.0]), "NaN or infinite"),
    (dict(box=[1.0, 2.0, 3.0]), "box of shape N x 4"),
    (dict(box=[[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 6.0, 6.0]]), "predict_batch"),
    (dict(point_coords=POINT, point_labels=LABEL, mask_input=np.zeros((1, 64, 64))), "1 x 256 x 256"),
    (dict(point_coords=POINT, point_labels=LABEL, mask_input=np.zeros((2, 256, 256))), "1 x 256 x 256"),
    (dict(point_coords=POINT, point_labels=LABEL, mask_input=np.full((1, 256, 256), np.nan)), "NaN"),
])
def test_predict_rejects_bad_prompts(predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(**kwargs)


def test_predict_output_shapes(predictor):
    masks, scores, low_res = predictor.predict(POINT, LABEL, multimask_output=True)
    assert masks.shape == (3, H, W) and masks.dtype == bool
    assert scores.shape == (3,) and low_res.shape == (3, 256, 256)
    assert scores.dtype == np.float32 and low_res.dtype == np.float32

    best = low_res[int(np.argmax(scores))]
    box = np.array([10.0, 5.0, 70.0, 50.0])
    for mask_input in (best[None], best):  # 1 x 256 x 256, or 256 x 256
        m1, s1, l1 = predictor.predict(POINT, LABEL, box=box, mask_input=mask_input, multimask_output=False)
        assert m1.shape == (1, H, W) and s1.shape == (1,) and l1.shape == (1, 256, 256)
        assert np.isfinite(l1).all()
    # the mask prompt is used: without it the logits differ
    _, _, plain = predictor.predict(POINT, LABEL, box=box, multimask_output=False)
    assert not np.allclose(plain, l1)

    logits, _, _ = predictor.predict(box=box[None], multimask_output=False, return_logits=True)
    assert logits.shape == (1, H, W) and logits.dtype == np.float32


def test_predict_batch(predictor):
    boxes = np.array([[0.0, 0.0, 30.0, 30.0], [20.0, 10.0, 90.0, 60.0]])
    out = predictor.predict_batch(boxes=boxes)
    assert out.masks.shape == (2, 1, H, W) and out.scores.shape == (2, 1)
    assert out.low_res_logits.shape == (2, 1, 256, 256)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "at least one object"),
    (dict(boxes=np.zeros((0, 4))), "at least one object"),
    (dict(boxes=np.array([[0.0, 0.0, 5.0, 5.0]] * 2), point_coords=[POINT] * 3, point_labels=[LABEL] * 3),
     "2 boxes but 3 point lists"),
    (dict(point_coords=[POINT, POINT], point_labels=[LABEL]), "one point_labels array per point_coords"),
    (dict(point_coords=[POINT]), "one point_labels array per point_coords"),
    (dict(point_labels=[LABEL]), "without point_coords"),
    (dict(point_coords=[POINT, np.array([[1.0, np.nan]])], point_labels=[LABEL, LABEL]), "NaN"),
    (dict(point_coords=[POINT], point_labels=[np.array([3])]), "0 .*or 1"),
    (dict(boxes=np.array([[5.0, 5.0, 1.0, 9.0]])), "X1 >= X0"),
])
def test_predict_batch_rejects_bad_prompts(predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict_batch(**kwargs)
