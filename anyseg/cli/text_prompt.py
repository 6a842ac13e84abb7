"""``anyseg segment IMAGE --text "dog. red cup."``: text prompts (Grounded SAM) for the segment command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"

TEXT_HELP = """\
text prompts (Grounded SAM): --text "dog. red cup." finds the phrases with Grounding DINO (the 'text'
extra: pip install 'anyseg[text]'), one box per object, and segments each box. Writes into OUTDIR
<stem>_mask_<i>.png per object, <stem>_overlay.png, <stem>.json (label, detector confidence, box and mask
score per object) and <stem>_coco.json (COCO instances; the categories are the caption's phrases)."""


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text prompts (Grounded SAM)", TEXT_HELP)
    group.add_argument("--text", "-t", default=None, metavar="PHRASES",
                       help="phrases separated by periods, e.g. \"dog. red cup.\" (instead of --point / --box)")
    group.add_argument("--detector", default=DEFAULT_DETECTOR, metavar="DIR_OR_HUB_ID",
                       help=f"Grounding DINO model: a local directory or a Hugging Face hub id (default: "
                            f"{DEFAULT_DETECTOR}, downloaded once by transformers)")
    group.add_argument("--box-threshold", type=float, default=0.35, metavar="P",
                       help="keep a detection whose confidence exceeds P (default 0.35, as Grounded SAM)")
    group.add_argument("--text-threshold", type=float, default=0.25, metavar="P",
                       help="a phrase labels a detection when its confidence on the phrase exceeds P (default 0.25)")
    group.add_argument("--max-objects", type=int, default=None, metavar="N",
                       help="segment at most N detections (most confident first)")


def run_text(args: argparse.Namespace, model=None) -> int:
    """The segment command with ``--text`` (``model``: the already loaded ``--model``, if any)."""
    from ..beyond.text import GroundingDinoSource, segment_text, write_text_outputs
    from ..imageio import load_image
    from ..protocol import make_predictor
    from .common import load_model_from_args

    if args.point or args.box is not None:
        raise ValueError("--text replaces --point / --box: give one or the other")
    image = load_image(args.image)
    source = GroundingDinoSource(args.detector, box_threshold=args.box_threshold,
                                 text_threshold=args.text_threshold, device=getattr(args, "device", None))
    model = model if model is not None else load_model_from_args(args)
    predictor = make_predictor(model)
    hq = {"hq_token_only": True} if args.hq_token_only else {}
    if hq and not getattr(model, "is_hq", False):
        raise ValueError(f"--hq-token-only applies to HQ-SAM models only; {args.model} has no HQ token")
    result = segment_text(predictor, image, args.text, source, multimask=args.multimask,
                          max_boxes=args.max_objects, **hq)
    stem = Path(args.image).stem
    write_text_outputs(result, image, args.output, stem, image_name=str(args.image),
                       extra={"model": str(args.model), "family": predictor.family, "detector": str(args.detector),
                              "box_threshold": args.box_threshold, "text_threshold": args.text_threshold})
    found = ", ".join(f"{label} ({s:.2f})" for label, s in zip(result.labels, result.box_scores)) or "nothing"
    print(f"'{result.caption}': found {found}; wrote {len(result.masks)} mask(s) to {args.output}", file=sys.stderr)
    return 0
