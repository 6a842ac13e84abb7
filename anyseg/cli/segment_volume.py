"""``anyseg segment-volume``: segment one object through a CT / MR volume from a box on one slice (MedSAM)."""
from __future__ import annotations

import argparse
import sys

from .common import add_model_arguments, parse_numbers

DESCRIPTION = """\
Segment one object through a 3-D scan from a box on one slice (MedSAM-style): SCAN is a NIfTI file
(.nii / .nii.gz) or a directory holding one DICOM series (the 'medical' extra: pip install
'anyseg[medical]'). The slices are windowed to 8 bits (--window), the prompted slice is segmented from
the box, then each next slice in both directions from the previous mask's box, until the object ends.
Writes OUT as a NIfTI mask (1 = object) with the input's geometry (affine and voxel spacing), and prints
the slices segmented and the volume in mL.
Coordinates: the volume is X x Y x Z in voxel indices (NIfTI order); Z picks the slice, X0,Y0,X1,Y1 is the
box on it (X along the first axis, Y along the second). With --model medsam_vit_b or a MedSAM file the
slices get MedSAM's preprocessing (square resize, min-max to [0, 1]); other models get their own."""

EXAMPLES = """\
examples:
  anyseg segment-volume scan.nii.gz --box 40,120,96,160,150 --window soft-tissue -o tumour.nii.gz
  anyseg segment-volume dicom_series/ --box 12,200,180,260,240 --window=-160,240 --model medsam_vit_b -o liver.nii.gz"""


def _volume_box(text: str):
    values = parse_numbers(text, (5,), "--box Z,X0,Y0,X1,Y1")
    z, x0, y0, x1, y1 = values
    if z != int(z) or z < 0:
        raise argparse.ArgumentTypeError(f"--box: Z must be a slice index (0, 1, ...), got {text!r}")
    if x1 <= x0 or y1 <= y0:
        raise argparse.ArgumentTypeError(f"--box needs X1 > X0 and Y1 > Y0, got {text!r}")
    return int(z), [x0, y0, x1, y1]


def _window(text: str):
    from ..beyond.medical import WINDOWS

    if text in WINDOWS:
        return text
    lo, hi = parse_numbers(text, (2,), "--window LO,HI")
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"--window needs HI > LO, got {text!r}")
    return (lo, hi)


def register(subparsers) -> None:
    from ..beyond.medical import WINDOWS

    parser = subparsers.add_parser("segment-volume", help="segment an object through a NIfTI / DICOM volume from one box",
                                   description=DESCRIPTION, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scan", metavar="SCAN", help="NIfTI file (.nii, .nii.gz) or DICOM series directory")
    parser.add_argument("--box", required=True, type=_volume_box, metavar="Z,X0,Y0,X1,Y1",
                        help="slice index Z and the object's box on that slice (voxel indices)")
    parser.add_argument("--window", type=_window, default=None, metavar="LO,HI|NAME",
                        help=f"intensity window mapped to 0..255, e.g. --window=-160,240 (CT soft tissue; with = because the value starts with -) or a name: "
                             f"{', '.join(WINDOWS)} (default: the volume's 0.5 to 99.5 percentiles, for MR)")
    parser.add_argument("--preprocess", choices=("auto", "medsam", "sam"), default="auto",
                        help="slice preprocessing: medsam (square resize, min-max), sam (the model's own) or auto "
                             "(medsam for MedSAM models; default)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="grow each propagated box by this fraction of its size (default 0.1)")
    parser.add_argument("--max-shift", type=float, default=0.2,
                        help="stop when a slice's mask is brighter or darker than the previous one's by more than "
                             "this fraction of the window (default 0.2)")
    parser.add_argument("-o", "--output", required=True, metavar="MASK.nii.gz", help="output NIfTI mask")
    add_model_arguments(parser, speed=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..beyond.medical import (is_medsam_name, load_medsam, make_medical_predictor, read_volume, segment_volume,
                                  write_volume)
    from .common import load_model_from_args

    if not (args.output.endswith(".nii") or args.output.endswith(".nii.gz")):
        raise ValueError(f"-o needs a NIfTI file name (.nii or .nii.gz), got {args.output}")
    volume = read_volume(args.scan)
    z, box = args.box
    if is_medsam_name(args.model):
        model = load_medsam(args.model, device=args.device)
    else:
        model = load_model_from_args(args)
    predictor = make_medical_predictor(model, args.preprocess)
    result = segment_volume(predictor, volume, z, box, window_bounds=args.window, margin=args.margin,
                            max_shift=args.max_shift, progress=True)
    write_volume(args.output, result.mask, volume)
    ml = float(result.mask.sum() * np.prod(volume.spacing) / 1000.0)
    first, last = result.slices[0], result.slices[-1]
    print(f"segmented slices {first}..{last} ({len(result.slices)} of {volume.data.shape[2]}), {int(result.mask.sum())} "
          f"voxels = {ml:.2f} mL: {args.output}", file=sys.stderr)
    return 0
