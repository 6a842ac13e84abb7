"""``anyseg personalize``: one-shot personalization (PerSAM): segment the object of a reference mask in new images."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_arguments, load_model_from_args

DESCRIPTION = """\
Segment "this object" in new images from one example (PerSAM, training-free): REF and its mask show the
object; each TARGET gets the object's mask. The reference mask's average feature locates the object in
each target (a positive click at the best match, a negative one at the worst), guides the decoder's
attention, joins its prompt tokens, and the mask is refined twice (mask prompt, then box).
Writes into OUTDIR for each target:
  <stem>_mask.png      the mask (white = object)
  <stem>_overlay.png   the target with the mask and the two location clicks
and personalize.json (score, clicks, area per target). Works with SAM 1, HQ-SAM and SAM 2 models."""

EXAMPLES = """\
examples:
  anyseg personalize --ref dog.jpg --ref-mask dog_mask.png park1.jpg park2.jpg -o out/
  anyseg personalize --ref cup.png --ref-mask cup_mask.png shelf/*.jpg --model vit_b -o out/"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("personalize", help="segment the object of a reference mask in new images (PerSAM)",
                                   description=DESCRIPTION, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+", metavar="TARGET", help="images to segment the object in")
    parser.add_argument("--ref", required=True, metavar="IMAGE", help="reference image showing the object")
    parser.add_argument("--ref-mask", required=True, metavar="MASK.png",
                        help="the object's mask in the reference image (white / nonzero = object, same size)")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="weight of the target-guided attention (0 switches it off; default 1)")
    parser.add_argument("--no-semantic-prompt", action="store_true",
                        help="do not add the target embedding to the decoder's tokens")
    parser.add_argument("--refine", type=int, choices=(0, 1, 2), default=2,
                        help="cascaded post-refinement stages: 0, 1 (mask prompt) or 2 (then box; default)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory (created)")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..atomic import write_json_atomic, write_png_atomic
    from ..beyond.personalize import PerSAM
    from ..imageio import load_image
    from ..protocol import make_predictor
    from ..visualize import overlay_masks

    for name in [args.ref, args.ref_mask, *args.targets]:
        if not Path(name).is_file():
            raise FileNotFoundError(f"file not found: {name}")
    predictor = make_predictor(load_model_from_args(args))
    persam = PerSAM(predictor, alpha=args.alpha, semantic_prompt=not args.no_semantic_prompt, refine=args.refine)
    persam.set_reference(args.ref, args.ref_mask)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    stems = set()
    for target in tqdm(args.targets, desc="personalize", unit="image", disable=len(args.targets) < 2):
        stem = Path(target).stem
        if stem in stems:
            raise ValueError(f"two targets are named {stem!r}: their outputs would overwrite each other")
        stems.add(stem)
        image = load_image(target)
        result = persam.segment(image)
        write_png_atomic(out / f"{stem}_mask.png", result.mask)
        write_png_atomic(out / f"{stem}_overlay.png", overlay_masks(image, result.mask[None], points=result.points,
                                                                    point_labels=result.point_labels))
        records.append({"image": str(target), "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png",
                        "score": result.score, "area": int(result.mask.sum()),
                        "points": result.points.tolist(), "point_labels": result.point_labels.tolist()})
    write_json_atomic(out / "personalize.json", {"reference": str(args.ref), "reference_mask": str(args.ref_mask),
                                                 "model": str(args.model), "family": predictor.family,
                                                 "alpha": args.alpha, "semantic_prompt": not args.no_semantic_prompt,
                                                 "refine": args.refine, "targets": records}, indent=2)
    print(f"wrote {len(records)} mask(s) to {out}", file=sys.stderr)
    return 0
