"""Text prompts (Grounded SAM): a caption becomes boxes with phrase labels, and SAM turns the boxes into masks.

A *box source* is any callable ``source(image, caption) -> Detections``: boxes in original-image pixels
(XYXY), a confidence per box and the caption phrase each box was found for. :class:`GroundingDinoSource`
is the default one (Grounding DINO through Hugging Face ``transformers``, the ``text`` extra); any other
detector plugs in through the same call. :func:`segment_text` runs a source and a predictor::

    from anyseg import load_model, make_predictor
    from anyseg.beyond.text import GroundingDinoSource, segment_text

    source = GroundingDinoSource("IDEA-Research/grounding-dino-tiny")   # or a local model directory
    result = segment_text(make_predictor(load_model("vit_b")), "photo.jpg", "dog. red cup.", source)
    result.masks, result.labels, result.scores

Captions follow Grounding DINO's convention: phrases separated by periods (``"dog. red cup."``), lower
case. Box and text thresholds are Grounded SAM's: a query is kept when its best token confidence exceeds
``box_threshold``; its label is the caption phrase whose tokens it matches best, provided that match
exceeds ``text_threshold``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import require

__all__ = ["Detections", "GroundingDinoSource", "TextSegmentation", "normalize_caption", "segment_text",
           "split_phrases", "write_text_outputs"]


def normalize_caption(text: str) -> str:
    """``"Dog. Red cup"`` -> ``"dog. red cup."``: lower case, phrases separated and ended by periods."""
    phrases = split_phrases(text)
    if not phrases:
        raise ValueError(f"empty text prompt {text!r}: give phrases separated by periods, e.g. 'dog. red cup.'")
    return " ".join(p + "." for p in phrases)


def split_phrases(text: str) -> List[str]:
    """The phrases of a caption, in order: ``"dog. red cup."`` -> ``["dog", "red cup"]``."""
    if not isinstance(text, str):
        raise ValueError(f"a text prompt must be a string, got {type(text).__name__}")
    return [" ".join(p.lower().split()) for p in text.split(".") if p.strip()]


@dataclass
class Detections:
    """What a box source finds: ``boxes`` ``N x 4`` XYXY original-image pixels, ``scores`` ``N``, ``labels``
    (``N`` phrases of the caption)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: List[str]

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.labels = [str(label) for label in self.labels]
        n = len(self.boxes)
        if len(self.scores) != n or len(self.labels) != n:
            raise ValueError(f"a box source must give one score and one label per box: {n} boxes, "
                             f"{len(self.scores)} scores, {len(self.labels)} labels")
        if n and not np.all(np.isfinite(self.boxes)):
            raise ValueError("a box source returned NaN or infinite box coordinates")


BoxSource = Callable[[np.ndarray, str], Detections]


class GroundingDinoSource:
    """Grounding DINO (``GroundingDinoForObjectDetection`` and its processor from ``transformers``).

    Args:
        model: a local model directory or a hub id (``IDEA-Research/grounding-dino-tiny``), or a loaded
            ``GroundingDinoForObjectDetection`` (then ``processor`` is needed).
        processor: a ``GroundingDinoProcessor`` (default: loaded from ``model``'s directory / id).
        box_threshold: keep a query whose best token confidence exceeds this (Grounded SAM: 0.35).
        text_threshold: a phrase labels a box when the box's confidence on the phrase's tokens exceeds this
            (Grounded SAM: 0.25); boxes without such a phrase are dropped.
        device: torch device (default: the model's).
    """

    def __init__(self, model, processor=None, *, box_threshold: float = 0.35, text_threshold: float = 0.25,
                 device=None) -> None:
        transformers = require("transformers", "text", "text prompts (Grounding DINO)")
        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            name = str(model)
            if processor is None:
                processor = _load_processor(transformers, name)
            model = transformers.GroundingDinoForObjectDetection.from_pretrained(name)
        elif processor is None:
            raise ValueError("pass the processor with a loaded Grounding DINO model")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.processor = processor

    @property
    def device(self):
        return next(self.model.parameters()).device

    def __call__(self, image, caption: str) -> Detections:
        import torch

        from ..imageio import load_image

        image = load_image(image)
        caption = normalize_caption(caption)
        phrases = split_phrases(caption)
        inputs = self.processor(images=image, text=caption, return_tensors="pt")
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        probs = outputs.logits[0].sigmoid().float().cpu().numpy()  # queries x text positions
        boxes = outputs.pred_boxes[0].float().cpu().numpy()        # queries x (cx, cy, w, h), 0..1
        ids = inputs["input_ids"][0].cpu().numpy()
        spans = phrase_token_spans(ids, self.processor.tokenizer, len(phrases))
        h, w = image.shape[:2]
        return detections_from_logits(probs, boxes, spans, phrases, (h, w), self.box_threshold,
                                      self.text_threshold)


def _load_processor(transformers, name: str):
    """The processor of a model directory / hub id, with the PIL image processor (no torchvision needed)."""
    from transformers.models.grounding_dino import GroundingDinoProcessor

    try:
        from transformers.models.grounding_dino.image_processing_pil_grounding_dino import \
            GroundingDinoImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: the slow processor is the PIL one
        ImageProcessor = transformers.GroundingDinoImageProcessor
    return GroundingDinoProcessor(image_processor=ImageProcessor.from_pretrained(name),
                                  tokenizer=transformers.AutoTokenizer.from_pretrained(name))


def phrase_token_spans(input_ids: Sequence[int], tokenizer, n_phrases: int) -> List[List[int]]:
    """For each phrase of a normalized caption, the positions of its tokens in ``input_ids``.

    The caption's phrases end with a period token; special tokens ([CLS], [SEP], padding) and the
    periods belong to no phrase."""
    period = tokenizer.convert_tokens_to_ids(".")
    special = set(getattr(tokenizer, "all_special_ids", []))
    spans: List[List[int]] = [[] for _ in range(n_phrases)]
    phrase = 0
    for pos, token in enumerate(int(t) for t in input_ids):
        if token in special:
            continue
        if token == period:
            phrase += 1
            continue
        if phrase < n_phrases:
            spans[phrase].append(pos)
    return spans


def detections_from_logits(probs: np.ndarray, boxes_cxcywh: np.ndarray, spans: Sequence[Sequence[int]],
                           phrases: Sequence[str], image_size: Tuple[int, int], box_threshold: float,
                           text_threshold: float) -> Detections:
    """Grounding DINO's outputs for one image -> :class:`Detections` in original-image pixels.

    ``probs`` ``Q x T`` token confidences (sigmoid of the logits), ``boxes_cxcywh`` ``Q x 4`` normalized
    centre / size, ``spans`` each phrase's token positions."""
    h, w = image_size
    n_text = probs.shape[1]
    phrase_scores = np.stack([probs[:, [p for p in span if p < n_text]].max(axis=1) if any(p < n_text for p in span)
                              else np.zeros(len(probs)) for span in spans], axis=1) if spans else np.zeros((len(probs), 0))
    keep_boxes, keep_scores, keep_labels = [], [], []
    for q in range(len(probs)):
        score = float(probs[q].max())
        if score <= box_threshold or phrase_scores.shape[1] == 0:
            continue
        best = int(np.argmax(phrase_scores[q]))
        if phrase_scores[q, best] <= text_threshold:
            continue
        cx, cy, bw, bh = boxes_cxcywh[q]
        box = np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        box = np.clip(box, 0, [w, h, w, h])
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        keep_boxes.append(box)
        keep_scores.append(score)
        keep_labels.append(phrases[best])
    return Detections(np.array(keep_boxes).reshape(-1, 4), np.array(keep_scores), keep_labels)


@dataclass
class TextSegmentation:
    """Masks for the objects a caption named: ``masks`` ``N x H x W`` bool, ``scores`` ``N`` (SAM's
    predicted IoU), ``boxes`` ``N x 4`` (the detector's, original pixels), ``box_scores`` ``N`` (the
    detector's confidence) and ``labels`` ``N`` phrases."""

    masks: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    box_scores: np.ndarray
    labels: List[str]
    caption: str = ""
    categories: List[str] = field(default_factory=list)


def segment_text(predictor, image, text: str, source: Union[BoxSource, str], *, multimask: bool = False,
                 max_boxes: Optional[int] = None, nms_iou: float = 0.8, **decode_options) -> TextSegmentation:
    """Masks for the phrases of ``text`` found in ``image``.

    Args:
        predictor: any :class:`~anyseg.protocol.ImagePredictor` (``make_predictor(model)``).
        image: ``H x W x 3`` uint8 RGB, a PIL image or a path.
        text: phrases separated by periods, ``"dog. red cup."``.
        source: a box source (callable ``(image, caption) -> Detections``) or a Grounding DINO model
            directory / hub id.
        multimask: decode three candidates per box and keep the best-scoring one (default: one mask per box,
            as Grounded SAM does).
        max_boxes: keep at most this many boxes (highest confidence first).
        nms_iou: drop a box overlapping a more confident box of the same phrase by more than this IoU
            (1 keeps all).
        decode_options: passed to ``predictor.decode_batch`` (e.g. ``hq_token_only=True`` for HQ-SAM).
    """
    from ..imageio import load_image

    image = load_image(image)
    caption = normalize_caption(text)
    if isinstance(source, str):
        source = GroundingDinoSource(source)
    if not callable(source):
        raise ValueError(f"source must be a callable (image, caption) -> Detections or a model name, got "
                         f"{type(source).__name__}")
    found = source(image, caption)
    if not isinstance(found, Detections):
        found = Detections(*found)
    order = _select(found, nms_iou, max_boxes)
    boxes, box_scores = found.boxes[order], found.scores[order]
    labels = [found.labels[i] for i in order]
    h, w = image.shape[:2]
    categories = split_phrases(caption)
    for label in labels:
        if label not in categories:
            categories.append(label)
    if not len(boxes):
        return TextSegmentation(np.zeros((0, h, w), bool), np.zeros(0), boxes, box_scores, labels, caption,
                                categories)
    predictor.set_image(image)
    decoded = predictor.decode_batch(boxes=boxes, multimask_output=multimask, **decode_options)
    best = np.argmax(decoded.scores, axis=1)
    idx = np.arange(len(boxes))
    masks = np.asarray(decoded.masks[idx, best]).astype(bool)
    scores = np.asarray(decoded.scores[idx, best], dtype=np.float64)
    return TextSegmentation(masks, scores, boxes, box_scores, labels, caption, categories)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x1, y1 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _select(found: Detections, nms_iou: float, max_boxes: Optional[int]) -> List[int]:
    """Indices of the boxes kept: by confidence, without near-duplicates of the same phrase."""
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be at least 1, got {max_boxes}")
    order = [int(i) for i in np.argsort(-found.scores, kind="stable")]
    kept: List[int] = []
    for i in order:
        same = [j for j in kept if found.labels[j] == found.labels[i]]
        if same and nms_iou < 1 and _box_iou(found.boxes[[i]], found.boxes[same]).max() > nms_iou:
            continue
        kept.append(i)
        if max_boxes is not None and len(kept) == max_boxes:
            break
    return kept


def write_text_outputs(result: TextSegmentation, image: np.ndarray, out_dir, stem: str, *, image_name: str,
                       extra: Optional[dict] = None) -> dict:
    """Write ``<stem>_mask_<i>.png``, ``<stem>_overlay.png``, ``<stem>.json`` (masks, labels, scores, boxes)
    and ``<stem>_coco.json`` (COCO instances whose categories are the caption's phrases) into ``out_dir``;
    returns the JSON record."""
    from pathlib import Path

    from ..atomic import write_json_atomic, write_png_atomic
    from ..formats import to_coco_rle
    from ..visualize import overlay_masks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = image.shape[:2]
    files = []
    for i, mask in enumerate(result.masks):
        name = f"{stem}_mask_{i}.png"
        write_png_atomic(out / name, mask)
        files.append(name)
    overlay = overlay_masks(image, result.masks, boxes=result.boxes if len(result.boxes) else None)
    write_png_atomic(out / f"{stem}_overlay.png", overlay)
    category_id = {name: i + 1 for i, name in enumerate(result.categories)}
    objects = []
    annotations = []
    for i, (mask, label) in enumerate(zip(result.masks, result.labels)):
        box = [float(v) for v in result.boxes[i]]
        objects.append({"file": files[i], "label": label, "score": float(result.scores[i]),
                        "box_score": float(result.box_scores[i]), "box_xyxy": box, "area": int(mask.sum())})
        rle = to_coco_rle(mask)
        ys, xs = np.nonzero(mask)
        bbox = [0.0, 0.0, 0.0, 0.0] if not len(xs) else [float(xs.min()), float(ys.min()),
                                                          float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        annotations.append({"id": i + 1, "image_id": 1, "category_id": category_id[label], "segmentation": rle,
                            "area": int(mask.sum()), "bbox": bbox, "iscrowd": 0, "score": float(result.scores[i])})
    record = {"image": image_name, "image_size": {"height": int(h), "width": int(w)}, "caption": result.caption,
              "objects": objects, "overlay": f"{stem}_overlay.png", **(extra or {})}
    write_json_atomic(out / f"{stem}.json", record, indent=2)
    coco = {"images": [{"id": 1, "file_name": image_name, "height": int(h), "width": int(w)}],
            "categories": [{"id": i, "name": n} for n, i in category_id.items()], "annotations": annotations}
    write_json_atomic(out / f"{stem}_coco.json", coco)
    return record
