"""``anyseg eval``: prompted-segmentation mIoU of a model on a dataset."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_arguments, load_model_from_args

DESCRIPTION = """\
Measure how well a model segments the instances of a dataset from simulated prompts:
  1 point     a click at the mask pixel farthest from its boundary; 'oracle' = best of the three
              outputs, 'confident' = the output with the highest predicted IoU
  box         the mask's tight box, single output
  N clicks    mIoU after 1..N clicks; each next click goes to the centre of the largest error
              region (foreground on missed object, background on false positives), with the
              previous mask fed back as the mask prompt
IoU is measured in the original image frame. Prints a table and writes <stem>.json (summary and
per-instance IoUs) and <stem>.png (the click curve) into OUTDIR. --model takes SAM 1 (ViT, MobileSAM)
and SAM 2 / 2.1 checkpoints (SAM 2's low-res logits are fed back as the reference predictor returns
them, clamped to [-32, 32]).

DATA is 'synthetic[:count=N,seed=S,size=PX]', a COCO instances .json (with --images DIR), a folder
with images/ + labels/ (instance label-map PNGs), or an SA-1B folder (jpg + json pairs)."""

EXAMPLES = """\
examples:
  anyseg eval --model sam_vit_b_01ec64.pth --data annotations/instances_val2017.json --images val2017/ \\
      --max-images 100 -o eval/
  anyseg eval --model runs/tiny/model.pth --data synthetic:count=100,seed=1000,size=128 -o eval/tiny
  anyseg eval --model vit_small_checkpoint.pth --data synthetic:count=40,seed=1000,size=256 --clicks 9
  anyseg eval --model sam2.1_hiera_tiny.pt --data synthetic:count=40,seed=1000,size=256
  # the same checkpoint at 256 px (position tables resampled; 16x16 embedding grid)
  anyseg eval --model vit_small_checkpoint.pth --img-size 256 --data synthetic:count=40,seed=1000,size=256"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="1-point / box / multi-click mIoU of a model on a dataset", description=DESCRIPTION,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", "-d", required=True, metavar="DATA", help="dataset (see above)")
    parser.add_argument("--images", default=None, metavar="DIR", help="image folder of a COCO .json")
    parser.add_argument("--clicks", type=int, default=5, help="clicks in the multi-click curve (default 5)")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--max-instances", type=int, default=None,
                        help="at most N instances per image (a seeded random choice)")
    parser.add_argument("--no-feed-logits", action="store_true",
                        help="do not feed the previous mask back as a prompt in the click curve")
    parser.add_argument("--batch-size", type=int, default=16, help="instances decoded together (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instance choice (default 0)")
    parser.add_argument("-o", "--output", default=None, metavar="OUTDIR",
                        help="write <stem>.json and <stem>.png here (default: print only)")
    parser.add_argument("--name", default=None, help="file stem and plot label (default: the model's file stem)")
    parser.add_argument("--img-size", type=int, default=None, metavar="PX",
                        help="run the model at this input size (square frame, px); a ViT checkpoint's position "
                             "tables are resampled (as 'anyseg train --img-size' does), so a 1024 px checkpoint "
                             "can be compared with a model fine-tuned at 256 px (default: the checkpoint's size)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json_atomic
    from ..protocol import model_family
    from ..train.datasets import open_dataset
    from ..train.evaluate import EvalConfig, evaluate
    from ..train.plot import plot_curves

    if args.clicks < 1:
        raise ValueError(f"--clicks must be at least 1, got {args.clicks}")
    for flag in ("max_images", "max_instances", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be a positive number of pixels, got {args.img_size}")
    dataset = open_dataset(args.data, args.images)
    model = load_model_from_args(args, img_size=args.img_size)
    cfg = EvalConfig(clicks=args.clicks, max_images=args.max_images, max_instances=args.max_instances,
                     feed_logits=not args.no_feed_logits, batch_size=args.batch_size, seed=args.seed)
    result = evaluate(model, dataset, cfg, progress=not args.quiet)
    name = args.name or Path(str(args.model)).stem
    print(result.table(f"model {args.model} on {args.data}"))
    if args.output:
        out = Path(args.output)
        summary = result.summary()
        record = {"model": str(args.model), "family": model_family(model), "data": str(args.data),
                  "img_size": model.img_size, "config": vars(cfg),
                  "summary": summary,
                  "per_instance": {"point_oracle": result.point_oracle, "point_confident": result.point_confident,
                                   "box": result.box, "clicks": result.curve}}
        write_json_atomic(out / f"{name}.json", record, indent=1)
        plot_curves(out / f"{name}.png", {name: summary["clicks_miou"]},
                    {"box": summary["box_miou"], "1 point oracle": summary["point_oracle_miou"]},
                    title=f"{name} on {args.data}"[:80])
        print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}", file=sys.stderr)
    return 0
