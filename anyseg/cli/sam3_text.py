"""``anyseg segment IMAGE --text ...`` with a SAM 3 model: concept prompts (every instance of a phrase,
optionally guided by exemplar boxes), instead of Grounding DINO boxes fed to SAM 1 / 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

SAM3_HELP = """\
with a SAM 3 model (--model sam3 or a sam3.pt file), --text "PHRASE[. PHRASE...]" finds every instance
of each phrase with SAM 3 itself (no Grounding DINO), and --box-exemplar X0,Y0,X1,Y1[,LABEL] adds an
example box (LABEL 1 = like this, 0 = not like this; alone, it finds things like the box). Writes
<stem>_mask_<i>.png per instance, <stem>_overlay.png (one colour per instance) and <stem>.json."""


def add_sam3_arguments(parser: argparse.ArgumentParser) -> None:
    from .common import parse_numbers

    def exemplar(text: str) -> List[float]:
        values = parse_numbers(text, (4, 5), "--box-exemplar X0,Y0,X1,Y1[,LABEL]")
        if values[2] < values[0] or values[3] < values[1]:
            raise argparse.ArgumentTypeError(f"--box-exemplar needs X1 >= X0 and Y1 >= Y0, got {text!r}")
        if len(values) == 5 and values[4] not in (0.0, 1.0):
            raise argparse.ArgumentTypeError(f"--box-exemplar label must be 1 or 0, got {text!r}")
        return values if len(values) == 5 else values + [1.0]

    group = parser.add_argument_group("concept prompts (SAM 3 models)", SAM3_HELP)
    group.add_argument("--box-exemplar", action="append", type=exemplar, default=[], metavar="X0,Y0,X1,Y1[,LABEL]",
                       help="an exemplar box in pixels; LABEL 1 = positive (default), 0 = negative; repeatable")
    group.add_argument("--concept-threshold", type=float, default=0.5, metavar="P",
                       help="keep instances whose score exceeds P (default 0.5, as SAM 3)")


def is_sam3(model) -> bool:
    from ..modeling.sam3 import Sam3

    return isinstance(model, Sam3)


def split_phrases(text: str) -> List[str]:
    """'dog. red cup.' -> ['dog', 'red cup'] (one concept per phrase)."""
    return [p.strip() for p in text.split(".") if p.strip()]


def run_sam3_segment(args: argparse.Namespace, model) -> int:
    import numpy as np

    from ..atomic import write_json_atomic, write_png_atomic
    from ..imageio import load_image
    from ..sam3_processor import Sam3Processor
    from ..visualize import overlay_masks

    if args.point or args.box is not None:
        raise ValueError("a SAM 3 model takes --text / --box-exemplar (concept prompts), not --point / --box")
    phrases = split_phrases(args.text) if args.text is not None else []
    if args.text is not None and not phrases:
        raise ValueError(f"--text {args.text!r} holds no phrase")
    if not phrases and not args.box_exemplar:
        raise ValueError("give --text PHRASE and / or --box-exemplar X0,Y0,X1,Y1")
    image = load_image(args.image)
    h, w = image.shape[:2]
    processor = Sam3Processor(model, resolution=model.image_size, confidence_threshold=args.concept_threshold)
    state = processor.set_image(image)
    boxes = [processor.xyxy_to_cxcywh_norm(b[:4], h, w) for b in args.box_exemplar]
    labels = [bool(b[4]) for b in args.box_exemplar]
    instances, masks = [], []
    for phrase in phrases or [None]:
        result = processor.segment(text=phrase, boxes=boxes, labels=labels, state=state)
        for mask, box, score in zip(result.masks, result.boxes, result.scores):
            instances.append({"label": phrase if phrase is not None else "exemplar", "score": float(score),
                              "bbox_xyxy": [float(v) for v in box], "area": int(mask.sum()),
                              "presence": result.presence})
            masks.append(mask)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    for i, (inst, mask) in enumerate(zip(instances, masks)):
        inst["file"] = f"{stem}_mask_{i}.png"
        write_png_atomic(out / inst["file"], mask)
    stack = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
    exemplar_boxes = np.array([b[:4] for b in args.box_exemplar]) if args.box_exemplar else None
    write_png_atomic(out / f"{stem}_overlay.png", overlay_masks(image, stack, boxes=exemplar_boxes))
    record = {
        "image": str(args.image), "image_size": {"height": h, "width": w}, "model": str(args.model),
        "family": "sam3",
        "prompt": {"phrases": phrases, "exemplars": [{"bbox_xyxy": b[:4], "label": int(b[4])} for b in args.box_exemplar],
                   "confidence_threshold": args.concept_threshold},
        "instances": instances, "overlay": f"{stem}_overlay.png",
    }
    write_json_atomic(out / f"{stem}.json", record, indent=2)
    counts = ", ".join(f"{p}: {sum(i['label'] == p for i in instances)}" for p in phrases) or f"{len(instances)}"
    print(f"found {counts}; wrote {len(instances)} mask(s) to {out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------ anyseg auto --text
class ConceptLabeler:
    """``anyseg auto --text`` with a SAM 3 model: ``generate(image)`` returns the records of every
    instance of every phrase (the image encoded once, each phrase's text encoding computed once for
    the whole run), phrase by phrase in query order, as ``anyseg auto`` writes them: ``segmentation``
    (COCO RLE), ``area``, ``score``, ``category_id`` (1 + the phrase's index) and ``label`` (the phrase)."""

    def __init__(self, model, phrases: List[str], confidence_threshold: float = 0.5) -> None:
        from ..sam3_processor import Sam3Processor

        if not phrases:
            raise ValueError("give at least one phrase")
        self.phrases = list(phrases)
        self.processor = Sam3Processor(model, resolution=model.image_size, confidence_threshold=confidence_threshold)

    def generate(self, image) -> List[dict]:
        from ..formats import to_coco_rle

        state = self.processor.set_image(image)
        records = []
        for k, phrase in enumerate(self.phrases):
            result = self.processor.segment(text=phrase, state=state)
            for mask, score in zip(result.masks, result.scores):
                records.append({"segmentation": to_coco_rle(mask), "area": int(mask.sum()), "score": float(score),
                                "category_id": k + 1, "label": phrase})
        state.clear()
        return records


def concept_categories(phrases: List[str]) -> List[dict]:
    """COCO categories for ``anyseg auto --text``: one per phrase, ids from 1 in the phrases' order."""
    return [{"id": k + 1, "name": phrase, "supercategory": "object"} for k, phrase in enumerate(phrases)]


def auto_phrases(text: str) -> List[str]:
    """The phrases of ``anyseg auto --text`` (checked: at least one, no repeats)."""
    phrases = split_phrases(text)
    if not phrases:
        raise ValueError(f"--text {text!r} holds no phrase (phrases are separated by '.')")
    repeated = sorted({p for p in phrases if phrases.count(p) > 1})
    if repeated:
        raise ValueError(f"--text names {', '.join(map(repr, repeated))} more than once")
    return phrases
