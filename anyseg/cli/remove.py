"""``anyseg remove``: remove an object (Inpaint Anything): SAM's mask, dilated, then filled."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_arguments, box_arg, load_model_from_args, point_arg

DESCRIPTION = """\
Remove one object from IMAGE: SAM masks it from a click and/or a box, the mask is grown by --dilate
pixels (to cover its soft edge and shadow) and the hole is filled from the surroundings. The default
fillers need no weights: telea / ns (OpenCV inpainting, the 'inpaint' extra: pip install
'anyseg[inpaint]') and biharmonic (scikit-image). --diffusion DIR fills a crop around the mask with a
local Stable Diffusion inpainting model instead (the 'inpaint-diffusion' extra).
Writes OUT (the image without the object) and, with --mask-out, the filled region as a PNG mask.
Works with SAM 1, HQ-SAM and SAM 2 models."""

EXAMPLES = """\
examples:
  anyseg remove photo.jpg --point 420,310 -o clean.png
  anyseg remove photo.jpg --box 100,80,620,540 --dilate 25 --filler ns -o clean.png --mask-out hole.png
  anyseg remove photo.jpg --point 420,310 --diffusion ./sd-inpainting -o clean.png"""


def register(subparsers) -> None:
    from ..beyond.remove import FILLERS

    parser = subparsers.add_parser("remove", help="remove an object: mask it, dilate, fill (Inpaint Anything)",
                                   description=DESCRIPTION, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", metavar="IMAGE", help="image file")
    parser.add_argument("--point", "-p", action="append", type=point_arg, default=[], metavar="X,Y[,LABEL]",
                        help="a click on the object (LABEL 1, default) or on what to keep (0); repeatable")
    parser.add_argument("--box", "-b", type=box_arg, default=None, metavar="X0,Y0,X1,Y1", help="a box around the object")
    parser.add_argument("--dilate", type=int, default=15, metavar="PX",
                        help="grow the mask by PX pixels before filling (default 15)")
    parser.add_argument("--filler", choices=FILLERS, default="telea",
                        help="how to fill: telea (default) or ns (OpenCV), biharmonic (scikit-image)")
    parser.add_argument("--radius", type=int, default=5, help="OpenCV inpainting neighbourhood radius (default 5)")
    parser.add_argument("--diffusion", default=None, metavar="DIR",
                        help="a local Stable Diffusion inpainting model directory (diffusers) to fill with instead")
    parser.add_argument("--prompt", default="", help="text prompt for --diffusion (default: empty)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.png", help="the image without the object")
    parser.add_argument("--mask-out", default=None, metavar="MASK.png", help="also write the filled region")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..atomic import write_png_atomic
    from ..beyond.remove import diffusers_filler, remove_object
    from ..imageio import load_image
    from ..protocol import make_predictor

    if not args.point and args.box is None:
        raise ValueError("say which object to remove: give --point X,Y and/or --box X0,Y0,X1,Y1")
    if args.dilate < 0:
        raise ValueError(f"--dilate must be 0 or more pixels, got {args.dilate}")
    if Path(args.output).suffix.lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"):
        raise ValueError(f"-o needs an image file name (.png, .jpg, ...), got {args.output}")
    image = load_image(args.image)
    filler = diffusers_filler(args.diffusion, args.prompt) if args.diffusion else args.filler
    predictor = make_predictor(load_model_from_args(args))
    points = np.array([p[:2] for p in args.point], dtype=np.float64) if args.point else None
    labels = np.array([int(p[2]) for p in args.point]) if args.point else None
    result = remove_object(predictor, image, points=points, point_labels=labels, box=args.box, dilate=args.dilate,
                           filler=filler, radius=args.radius)
    write_png_atomic(args.output, result.image) if args.output.lower().endswith(".png") else _write_other(args.output, result.image)
    if args.mask_out:
        write_png_atomic(args.mask_out, result.filled)
    print(f"removed an object of {int(result.mask.sum())} px (score {result.score:.3f}; filled {int(result.filled.sum())} px "
          f"with {'diffusion' if args.diffusion else args.filler}): {args.output}", file=sys.stderr)
    return 0


def _write_other(path: str, image) -> None:
    """Formats other than PNG, through PIL, still written to a temporary file and renamed."""
    import io

    from PIL import Image

    from ..atomic import write_bytes_atomic

    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".bmp": "BMP"}
    Image.fromarray(image).save(buf, format=fmt[Path(path).suffix.lower()])
    write_bytes_atomic(path, buf.getvalue())
