"""``anyseg segment``: masks for one object from point / box prompts."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_arguments, box_arg, load_model_from_args, point_arg
from .sam3_text import add_sam3_arguments
from .text_prompt import add_text_arguments

DESCRIPTION = """\
Segment one object in IMAGE from clicks and/or a box, like clicking in the interactive tool.
Writes into OUTDIR:
  <stem>_mask.png        the best mask (white = object), or <stem>_mask_<i>.png with --multimask
  <stem>_overlay.png     the image with the mask(s), points and box drawn on it
  <stem>.json            scores, mask boxes and areas, the prompt, the image size and the model
Coordinates are pixels of the original image, X to the right, Y down. Works with SAM 1 (ViT, MobileSAM)
and SAM 2 / 2.1 checkpoints alike."""

EXAMPLES = """\
examples:
  anyseg segment photo.jpg --point 420,310 -o out/
  anyseg segment photo.jpg --point 420,310 --point 380,120,0 --multimask -o out/
  anyseg segment photo.jpg --box 100,80,620,540 --model sam_vit_b_01ec64.pth -o out/
  anyseg segment photo.jpg --point 420,310 --model sam2.1_hiera_tiny.pt -o out/
  anyseg segment photo.jpg --text "dog. red cup." --model vit_b -o out/
  anyseg segment photo.jpg --text "green vegetables" --model sam3 -o out/"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="segment one object from point / box prompts", description=DESCRIPTION,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="image file (JPEG, PNG, TIFF, WebP, ...)")
    parser.add_argument("--point", "-p", action="append", type=point_arg, default=[], metavar="X,Y[,LABEL]",
                        help="a click: LABEL 1 = on the object (default), 0 = background; repeatable")
    parser.add_argument("--box", "-b", type=box_arg, default=None, metavar="X0,Y0,X1,Y1",
                        help="a box around the object (top-left and bottom-right corners)")
    parser.add_argument("--multimask", action="store_true",
                        help="write all three candidate masks (whole, part, sub-part) instead of the best one")
    parser.add_argument("--hq-token-only", action="store_true",
                        help="HQ-SAM only: the HQ token's mask alone instead of the best SAM mask plus it")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory (created)")
    add_model_arguments(parser)
    add_text_arguments(parser)
    add_sam3_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..atomic import write_json_atomic, write_png_atomic
    from ..imageio import load_image
    from ..masks import batched_mask_to_box
    from ..protocol import make_predictor
    from ..visualize import overlay_masks

    if args.text is not None or args.box_exemplar:
        from .sam3_text import is_sam3, run_sam3_segment

        model = load_model_from_args(args)
        if is_sam3(model):  # SAM 3 reads the phrase itself (concept prompts)
            return run_sam3_segment(args, model)
        if args.box_exemplar:
            raise ValueError("--box-exemplar needs a SAM 3 model (--model sam3)")
        from .text_prompt import run_text

        return run_text(args, model=model)
    if not args.point and args.box is None:
        raise ValueError("give at least one --point X,Y[,LABEL], a --box X0,Y0,X1,Y1 or --text PHRASES")
    image = load_image(args.image)
    model = load_model_from_args(args)
    if args.hq_token_only and not getattr(model, "is_hq", False):
        raise ValueError(f"--hq-token-only applies to HQ-SAM models only; {args.model} has no HQ token")
    predictor = make_predictor(model)
    predictor.set_image(image)

    coords = np.array([p[:2] for p in args.point], dtype=np.float64) if args.point else None
    labels = np.array([int(p[2]) for p in args.point]) if args.point else None
    box = np.array(args.box) if args.box is not None else None
    # With one click, SAM's three candidates resolve the ambiguity; ask for them and keep the best
    # unless all three are wanted.
    multimask = args.multimask or (box is None and len(args.point) == 1)
    hq = {"hq_token_only": True} if args.hq_token_only else {}
    masks, scores, _ = predictor.decode(coords, labels, box, multimask_output=multimask, **hq)
    order = np.argsort(-scores) if args.multimask else np.argsort(-scores)[:1]
    masks, scores = masks[order], scores[order]

    import torch

    boxes = batched_mask_to_box(torch.from_numpy(masks)).tolist()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    mask_files = []
    for i, mask in enumerate(masks):
        name = f"{stem}_mask_{i}.png" if args.multimask else f"{stem}_mask.png"
        write_png_atomic(out / name, mask)
        mask_files.append(name)
    overlay = overlay_masks(image, masks[:1] if not args.multimask else masks, points=coords,
                            point_labels=labels, boxes=None if box is None else box[None])
    write_png_atomic(out / f"{stem}_overlay.png", overlay)
    record = {
        "image": str(args.image),
        "image_size": {"height": int(image.shape[0]), "width": int(image.shape[1])},
        "model": str(args.model),
        "family": predictor.family,
        "prompt": {"points": [] if coords is None else coords.tolist(),
                   "labels": [] if labels is None else labels.tolist(),
                   "box": None if box is None else box.tolist(), "multimask": bool(args.multimask)},
        "masks": [
            {"file": f, "score": float(s), "bbox_xyxy": [int(v) for v in b], "area": int(m.sum())}
            for f, s, b, m in zip(mask_files, scores, boxes, masks)
        ],
        "overlay": f"{stem}_overlay.png",
    }
    write_json_atomic(out / f"{stem}.json", record, indent=2)
    best = record["masks"][0]
    print(f"wrote {len(mask_files)} mask(s) to {out} (best score {best['score']:.3f}, area {best['area']} px)",
          file=sys.stderr)
    return 0
