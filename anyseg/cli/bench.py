"""``anyseg bench``: time the faithful and fast paths on this machine and check the fast paths' quality."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

DESCRIPTION = """\
Benchmark SAM on this machine: image encoding (ViT-B and MobileSAM), one click with three full-size
masks, and segment-everything (MobileSAM, 32 x 32 grid with default thresholds; and a keep-every-mask
run on a smaller grid that stresses mask post-processing). Each runs with the faithful float32 path
and with the fast paths of anyseg.speed (lossless, int8, bf16 where the CPU has native bf16, auto).
Speed rows use randomly initialised models (speed does not depend on the weights); quality rows compare
each fast path with the faithful path on the golden checkpoints (found via --shared or $ANYSEG_SHARED).
Prints markdown tables: wall and CPU seconds, speed-up, throughput, peak memory, mask IoU and
segment-everything record matching. GPU rows are added when CUDA is available.

SAM 2 rows (sam2_encode: set_image; sam2_click: one point, three masks at the image size; sam2_amg:
SAM2AutomaticMaskGenerator; sam2_quality: the golden SAM 2 checkpoint) time --model, by default the public
SAM 2.1 tiny architecture with random weights; the configurations alternate within each repeat and the
rows give medians. The CPU kind (ISA, AMX, AVX512-BF16) heads each table.

sam2_video (not run by default: several minutes): frames/s (steady state and average) and peak RSS
tracking 1 and 4 objects through the golden clip, faithful against SAM2VideoPredictor(speed=...), on the
golden SAM 2 checkpoint and the public tiny architecture with random weights (anyseg.fast.video_bench).
SAM 3 rows (not run by default; --tasks sam3_encode sam3_phrase sam3_quality): encode (explicit softmax
against the reference's SDPA attention) and the time per phrase on an encoded image (the reference
encodes the text for every prompt; lossless caches it per phrase), on --sam3-model (default: the golden
SAM 3 checkpoint, a reduced model); sam3_quality compares their detections."""

EXAMPLES = """\
examples:
  anyseg bench --quick
  anyseg bench --tasks click amg --device cpu
  anyseg bench --json bench.json --markdown bench.md --note "quiet machine"
  anyseg bench --tasks sam2_encode sam2_click --model sam2.1_hiera_s --random-weights
  anyseg bench --tasks sam2_encode sam2_click --model ~/checkpoints/sam2.1_hiera_tiny.pt
  anyseg bench --tasks sam3_encode sam3_phrase sam3_quality --note "loaded machine"
  python benchmarks/bench_speed.py --quick
  python benchmarks/bench_sam2_image.py"""

TASK_CHOICES = ("encode_vit_b", "encode_vit_t", "click", "amg", "amg_keepall", "quality",
                "encode_vit_h", "encode_vit_l", "sam2_encode", "sam2_click", "sam2_amg", "sam2_quality", "sam2_video",
                "sam3_encode", "sam3_phrase", "sam3_quality")
DEFAULT_TASKS = ("encode_vit_b", "encode_vit_t", "click", "amg", "amg_keepall", "quality",
                 "sam2_encode", "sam2_click", "sam2_amg", "sam2_quality")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark faithful vs fast paths", description=DESCRIPTION,
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, 16 x 16 segment-everything grid, one quality image")
    parser.add_argument("--tasks", nargs="+", choices=TASK_CHOICES, default=list(DEFAULT_TASKS), metavar="TASK",
                        help=f"rows to run: {', '.join(TASK_CHOICES)} (default: all but encode_vit_h / _l)")
    parser.add_argument("--device", action="append", default=None, metavar="DEV",
                        help="cpu and/or cuda (repeatable; default cpu, plus cuda when available)")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="image for the speed rows (default: images/dog.jpg from --shared, 800 x 534)")
    parser.add_argument("--shared", default=os.environ.get("ANYSEG_SHARED"), metavar="DIR",
                        help="reference data folder with golden/ and images/ (default $ANYSEG_SHARED)")
    parser.add_argument("--amg-side", type=int, default=None, metavar="N",
                        help="points per side for the segment-everything row (default 32, 16 with --quick)")
    parser.add_argument("--encode-batch", type=int, default=None, metavar="B",
                        help="time the encoder alone on B preprocessed images at once (default 1 on a CPU: "
                             "set_image per image; 8 on a GPU)")
    parser.add_argument("--amg-model", default=None, choices=("vit_t", "vit_b", "vit_l", "vit_h"),
                        help="model of the segment-everything rows (default vit_t on a CPU, vit_h on a GPU)")
    parser.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                        help="model of the SAM 2 rows: a SAM 2 checkpoint file, or a public name (sam2.1_hiera_t, "
                             "sam2_hiera_b+, ...) loaded from the local cache, or built with random weights with "
                             "--random-weights (default: sam2.1_hiera_t with random weights)")
    parser.add_argument("--sam3-model", default=None, metavar="NAME_OR_PATH",
                        help="SAM 3 model of the sam3_* rows (default: the golden SAM 3 checkpoint under --shared)")
    parser.add_argument("--random-weights", action="store_true",
                        help="with --model NAME: that public architecture with random weights (speed does not depend "
                             "on the weights; nothing is downloaded)")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="repeats of the SAM 2 rows (default: encode 5, click 30, segment everything 1; fewer "
                             "with --quick)")
    parser.add_argument("--compile", action="store_true",
                        help="add a 'compiled' config: auto + torch.compile of the image encoder")
    parser.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                        help="only these configurations (faithful, lossless, int8, bf16, fp16, auto, compiled; "
                             "which exist depends on the device)")
    parser.add_argument("--all-dtypes", action="store_true",
                        help="also time bf16 on CPUs without native bf16 (slow there; useful for quality)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="free text printed above the tables (e.g. machine load)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write all rows as JSON (atomic)")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also write the tables as markdown (atomic)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..atomic import atomic_write, write_json_atomic
    from ..fast.benchmark import run_benchmark

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.amg_side is not None and args.amg_side < 1:
        raise ValueError(f"--amg-side must be >= 1, got {args.amg_side}")
    if args.encode_batch is not None and args.encode_batch < 1:
        raise ValueError(f"--encode-batch must be >= 1, got {args.encode_batch}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.random_weights and args.model is None:
        raise ValueError("--random-weights needs --model NAME (a public SAM 2 name such as sam2.1_hiera_t)")
    shared = Path(args.shared) if args.shared else None
    video = "sam2_video" in args.tasks
    args.tasks = [t for t in args.tasks if t != "sam2_video"]
    out = {"results": []}
    if args.tasks:
        out = run_benchmark(tasks=args.tasks, quick=args.quick, devices=args.device,
                            image_path=Path(args.image) if args.image else None, shared=shared,
                            all_dtypes=args.all_dtypes, amg_side=args.amg_side, note=args.note,
                            encode_batch=args.encode_batch, amg_model=args.amg_model, compile=args.compile,
                            only_configs=args.configs, sam2_model_spec=args.model,
                            sam2_random_weights=True if args.random_weights else None, repeats=args.repeats,
                            sam3_model_spec=args.sam3_model,
                            log=lambda s: print(s, file=sys.stderr, flush=True))
    if video:
        from ..fast.video_bench import bench_section

        out["results"].append(bench_section(quick=args.quick, shared=shared, threads=args.threads,
                                            repeats=args.repeats, log=lambda s: print(s, file=sys.stderr, flush=True)))
    text = "\n\n".join(r["markdown"] for r in out["results"])
    print(text)
    if args.json:
        write_json_atomic(args.json, out, indent=1)
    if args.markdown:
        with atomic_write(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_speed", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
