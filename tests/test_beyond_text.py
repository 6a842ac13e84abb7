"""Text prompts: a tiny random Grounding DINO built here (offline), boxes in original pixels, boxes into SAM,
labels into the JSON and COCO outputs."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from anyseg import load_model, make_predictor
from anyseg.beyond import MissingExtra
from anyseg.beyond.demo import removal_scene
from anyseg.beyond.text import (Detections, normalize_caption, phrase_token_spans, segment_text)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "dog", "red", "cup", "cat", "a"]


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    """A random Grounding DINO with a tiny Swin, BERT and vocabulary, saved as a model directory."""
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers.models.grounding_dino import GroundingDinoProcessor
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    d = tmp_path_factory.mktemp("gdino")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = transformers.BertTokenizer(str(d / "vocab.txt"))
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 96}), tokenizer=tokenizer)
    config = transformers.GroundingDinoConfig(
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=6, num_feature_levels=4, encoder_n_points=2,
        decoder_n_points=2, max_text_len=16, use_timm_backbone=False, backbone=None,
        backbone_config=transformers.SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                                image_size=64, out_features=["stage2", "stage3", "stage4"]),
        text_config=transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=37, max_position_embeddings=64))
    torch.manual_seed(0)
    transformers.GroundingDinoForObjectDetection(config).eval().save_pretrained(d)
    processor.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def predictor():
    return make_predictor(load_model("nano"))


def test_caption_and_phrase_spans():
    assert normalize_caption("  Dog.  Red   cup ") == "dog. red cup."
    with pytest.raises(ValueError, match="empty"):
        normalize_caption(" . ")

    class Tok:
        all_special_ids = [2, 3]

        def convert_tokens_to_ids(self, token):
            return 5

    # [CLS] dog . red cup . [SEP]
    assert phrase_token_spans([2, 6, 5, 7, 8, 5, 3], Tok(), 2) == [[1], [3, 4]]


def test_grounding_dino_boxes_are_original_pixels(detector_dir):
    import torch

    from anyseg.beyond.text import GroundingDinoSource

    source = GroundingDinoSource(str(detector_dir), box_threshold=0.0, text_threshold=0.0)
    image = (np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8)
    found = source(image, "dog. red cup.")
    assert len(found.boxes) > 0 and set(found.labels) <= {"dog", "red cup"}
    # The same queries straight from the model: normalized centre / size scaled by the image's W and H.
    inputs = source.processor(images=image, text="dog. red cup.", return_tensors="pt")
    with torch.no_grad():
        out = source.model(**inputs)
    cx, cy, w, h = out.pred_boxes[0].numpy().T
    expected = np.clip(np.stack([(cx - w / 2) * 90, (cy - h / 2) * 60, (cx + w / 2) * 90, (cy + h / 2) * 60], 1),
                       0, [90, 60, 90, 60])
    scores = out.logits[0].sigmoid().max(-1).values.numpy()
    for box, score in zip(found.boxes, found.scores):
        i = int(np.argmin(np.abs(scores - score)))
        np.testing.assert_allclose(box, expected[i], atol=1e-3)
    strict = GroundingDinoSource(str(detector_dir), box_threshold=0.99, text_threshold=0.99)(image, "dog.")
    assert all(s > 0.99 for s in strict.scores)


def test_boxes_flow_into_sam_in_the_image_frame(predictor):
    image, truth, _ = removal_scene(seed=0)  # 120 x 160: not square
    ys, xs = np.nonzero(truth)
    box = [xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2]
    calls = []

    def source(img, caption):
        calls.append((img.shape, caption))
        return Detections([box, [0, 0, 20, 20]], [0.9, 0.5], ["disk", "corner"])

    result = segment_text(predictor, image, "Disk. corner", source)
    assert calls == [((120, 160, 3), "disk. corner.")]
    assert result.labels == ["disk", "corner"] and result.categories == ["disk", "corner"]
    assert result.masks.shape == (2, 120, 160)
    iou = (result.masks[0] & truth).sum() / (result.masks[0] | truth).sum()
    assert iou > 0.8
    predictor.set_image(image)
    direct = predictor.decode(box=np.array(box, float), multimask_output=False)
    np.testing.assert_array_equal(result.masks[0], direct.masks[0])
    empty = segment_text(predictor, image, "cat.", lambda img, c: Detections(np.zeros((0, 4)), [], []))
    assert empty.masks.shape == (0, 120, 160)


def test_segment_text_cli_writes_labels(detector_dir, tmp_path):
    from anyseg.cli import main

    image = (np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "photo.png"), "--text", "dog. red cup.", "--detector", str(detector_dir),
                 "--box-threshold", "0", "--text-threshold", "0", "-o", str(out)]) == 0
    record = json.loads((out / "photo.json").read_text())
    coco = json.loads((out / "photo_coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["dog", "red cup"]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert len(coco["annotations"]) == len(record["objects"]) > 0
    for ann, obj in zip(coco["annotations"], record["objects"]):
        assert names[ann["category_id"]] == obj["label"]
        assert (np.asarray(Image.open(out / obj["file"])) > 0).sum() == obj["area"] == ann["area"]
    assert main(["segment", str(tmp_path / "photo.png"), "--text", "dog.", "--point", "3,3", "-o", str(out)]) == 2


def test_missing_transformers_names_the_extra(monkeypatch):
    from anyseg.beyond.text import GroundingDinoSource

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtra, match=r"anyseg\[text\]"):
        GroundingDinoSource("some/model")
