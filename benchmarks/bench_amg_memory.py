"""Peak memory of segment-everything on a large image (6000 x 4000, crop_n_layers=2) on CPU.

Masks are upscaled a few at a time under a pixel budget and kept only as run lengths, so memory
stays bounded by the budget rather than growing with image size x number of masks. This script
prints a table of wall time, number of records and peak resident memory (RSS).

    python benchmarks/bench_amg_memory.py --model ../shared/golden/mobilesam_checkpoint.pth

Thresholds are disabled by default so that every proposal is kept at full resolution (the worst
case for memory); the grid is small because memory does not depend on the number of points per batch.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--model", default=str(here.parent / "shared/golden/mobilesam_checkpoint.pth"))
    parser.add_argument("--image", default=str(here.parent / "shared/images/truck.jpg"),
                        help="any photo; it is resized to --size")
    parser.add_argument("--size", default="6000x4000", help="W x H of the test image")
    parser.add_argument("--crop-n-layers", type=int, default=2)
    parser.add_argument("--points-per-side", type=int, default=8)
    parser.add_argument("--keep-all", action=argparse.BooleanOptionalAction, default=True,
                        help="disable the IoU / stability thresholds so every mask is kept")
    args = parser.parse_args(argv)

    import torch

    from anyseg import MaskGenerator, load_model

    width, height = (int(v) for v in args.size.lower().split("x"))
    image = np.asarray(Image.open(args.image).convert("RGB").resize((width, height), Image.BILINEAR))
    model = load_model(args.model, device="cpu")
    before = peak_rss_mib()
    thresholds = dict(pred_iou_thresh=-100.0, stability_score_thresh=-1.0) if args.keep_all else {}
    gen = MaskGenerator(model, points_per_side=args.points_per_side, crop_n_layers=args.crop_n_layers,
                        output_mode="coco_rle", progress=True, **thresholds)
    start = time.perf_counter()
    records = gen.generate(image)
    elapsed = time.perf_counter() - start
    peak = peak_rss_mib()
    print()
    print("| image | crop layers | grid | records | time | peak RSS (model loaded) | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {width}x{height} | {args.crop_n_layers} | {args.points_per_side}x{args.points_per_side} | "
          f"{len(records)} | {elapsed:.1f} s | {before:.0f} MiB | {peak:.0f} MiB |")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
