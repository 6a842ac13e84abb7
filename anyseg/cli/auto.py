"""``anyseg auto``: segment everything in many images, resumably."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .common import add_model_arguments, load_model_from_args, positive_int

FORMATS = ("sa1b", "coco", "png", "polygons")
COCO_FILE = "coco_instances.json"
MARKER_DIR = ".anyseg-auto"  # one small JSON per finished image, written last
_MARKER_VERSION = 1
_OVERLAY_PIXEL_BUDGET = 1 << 26  # mask pixels decoded at once when drawing an overlay

DESCRIPTION = f"""\
Segment everything: prompt SAM with a grid of points over each image (optionally over crops too) and
keep the good, distinct masks (SamAutomaticMaskGenerator; SAM2AutomaticMaskGenerator for a SAM 2 / 2.1
model). INPUT is any number of image files, folders (searched recursively) and glob patterns.

Outputs go to OUTDIR under each image's path relative to the inputs' common folder, without its
extension (BASE below; 'a.jpg' and 'a.png' side by side become 'a_jpg' and 'a_png'):
  sa1b      BASE.json             SA-1B JSON: masks as COCO RLE with area, bbox (XYWH), predicted_iou,
                                  point_coords, stability_score, crop_box
  coco      {COCO_FILE}   one COCO instances JSON for the run (plus BASE.json per image)
  png       BASE_labels.png       instance ids, 0 = background, id i = annotation i; smaller masks are
                                  painted over larger ones; 8-bit, or 16-bit beyond 255 masks
  polygons  BASE_polygons.json    polygons with holes per mask (pixel-corner XY), and
            BASE_yolo.txt         YOLO segmentation lines (class 0, coordinates in [0, 1])
  always    BASE_overlay.png      the masks drawn over the image (unless --no-overlay)
Every file is written atomically. An image is finished when its marker OUTDIR/{MARKER_DIR}/BASE.done.json
exists (written last); a later run skips finished images whose source file, model and generator
options are unchanged, so an interrupted run continues where it stopped. The COCO file is rebuilt on
every run from the per-image SA-1B files of all finished images among the inputs (image ids follow
the sorted input list). An image that cannot be read or segmented is reported and skipped; the run
ends with a summary line and exits with status 1 if any image failed."""

EXAMPLES = """\
examples:
  anyseg auto photos/ -o masks/ --model vit_b
  anyseg auto 'shots/**/*.png' img1.jpg -o out/ --format sa1b,png --no-overlay
  anyseg auto dataset/ -o out/ --format coco --coco-segmentation polygon --polygon-tolerance 1
  anyseg auto big.tif -o out/ --crop-n-layers 1 --crop-n-points-downscale-factor 2 \\
      --min-mask-region-area 100 --points-per-batch 128 --device cuda
  anyseg auto photos/ -o masks/ --model sam2.1_hiera_tiny.pt --use-m2m
  anyseg auto photos/ -o masks/      # run again: finished images are skipped
  anyseg auto shelves/ -o labels/ --model sam3 --text "green vegetables. red apple" --format coco,png"""

CONCEPT_HELP = """\
with a SAM 3 model (--model sam3 or a sam3.pt file), --text "PHRASE[. PHRASE...]" labels by concept
instead of segmenting everything: every instance of each phrase, with its score; the COCO file has the
phrases as categories (ids 1, 2, ... in the order given), the SA-1B and polygons JSON carry score,
category_id and label per mask, YOLO lines the class (category_id - 1). The generator options do not
apply. Resumable as above (the phrases and the threshold are part of the settings); not with --ray."""


def _non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
        return value
    return parse


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _formats_arg(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in FORMATS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"--format: expected some of {', '.join(FORMATS)} (comma-separated), got {text!r}")
    return names


#: The generators' own defaults, which differ between model families.
FAMILY_DEFAULTS = {"pred_iou_thresh": {"sam": 0.88, "sam2": 0.8}}
_FAMILY_NAMES = {"sam": "SAM 1", "sam2": "SAM 2"}

#: (option, MaskGenerator parameter, type, default, help); a default of None means the family's default.
GENERATOR_OPTIONS = (
    ("--points-per-side", "points_per_side", positive_int, 32, "grid points per image side (N x N prompts)"),
    ("--points-per-batch", "points_per_batch", positive_int, 64, "prompts decoded together (speed/memory only)"),
    ("--pred-iou-thresh", "pred_iou_thresh", float, None, "keep masks whose predicted IoU is above this (<= 0: off)"),
    ("--stability-score-thresh", "stability_score_thresh", float, 0.95,
     "keep masks whose stability score is at least this (<= 0: off)"),
    ("--stability-score-offset", "stability_score_offset", _non_negative(float), 1.0,
     "logit offset for the stability score"),
    ("--box-nms-thresh", "box_nms_thresh", _unit_float, 0.7, "box IoU above which duplicates in a crop are dropped"),
    ("--crop-n-layers", "crop_n_layers", _non_negative(int), 0, "extra crop layers (layer i: 2^i x 2^i crops)"),
    ("--crop-nms-thresh", "crop_nms_thresh", _unit_float, 0.7, "box IoU for duplicates across crops"),
    ("--crop-overlap-ratio", "crop_overlap_ratio", _unit_float, 512 / 1500, "overlap of neighbouring crops"),
    ("--crop-n-points-downscale-factor", "crop_n_points_downscale_factor", positive_int, 1,
     "crop layer i uses points-per-side / factor^i points per side"),
    ("--min-mask-region-area", "min_mask_region_area", _non_negative(float), 0,
     "fill holes / remove islands smaller than this many pixels (0: off; SAM 2: pixels of the 256 x 256 "
     "low-res masks)"),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "auto", help="segment everything in images or folders (resumable batch)", description=DESCRIPTION,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    parser.add_argument("--format", "-f", dest="formats", action="append", type=_formats_arg, metavar="FORMATS",
                        help=f"output formats, comma-separated or repeated: {', '.join(FORMATS)} (default: sa1b)")
    parser.add_argument("--coco-segmentation", choices=("rle", "polygon"), default="rle",
                        help="mask encoding in the COCO file (default: rle, lossless)")
    parser.add_argument("--polygon-tolerance", type=_non_negative(float), default=0.0, metavar="PX",
                        help="simplify polygons by this many pixels (Douglas-Peucker); 0 keeps the exact "
                             "pixel boundary (default)")
    parser.add_argument("--no-overlay", action="store_true", help="do not write BASE_overlay.png")
    parser.add_argument("--overwrite", action="store_true", help="redo finished images instead of skipping them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("generator options (as in SamAutomaticMaskGenerator)")
    for flag, dest, kind, default, text in GENERATOR_OPTIONS:
        if default is None:
            shown = ", ".join(f"{v:.4g} for {_FAMILY_NAMES[f]}" for f, v in FAMILY_DEFAULTS[dest].items())
        else:
            shown = f"{default:.4g}" if isinstance(default, float) else str(default)
        metavar = "X" if isinstance(default, float) or kind is float else "N"
        group.add_argument(flag, dest=dest, type=kind, default=default, metavar=metavar,
                           help=f"{text} (default: {shown})")
    group.add_argument("--use-m2m", action="store_true",
                       help="SAM 2 only: refine every mask with a second decoder pass prompted by its own mask")
    group.add_argument("--single-mask", action="store_true",
                       help="SAM 2 only: one mask per point instead of three (multimask_output=False)")
    group.add_argument("--hq-token-only", action="store_true",
                       help="HQ-SAM only: each point's HQ-token mask alone instead of the best SAM mask plus it")
    concept = parser.add_argument_group("concept labelling (SAM 3 models)", CONCEPT_HELP)
    concept.add_argument("--text", default=None, metavar="PHRASES",
                         help="phrases separated by '.': label every instance of each (SAM 3 models)")
    concept.add_argument("--concept-threshold", type=_unit_float, default=0.5, metavar="P",
                         help="keep instances whose score exceeds P (default 0.5, as SAM 3)")
    add_model_arguments(parser)
    from ..scale import add_ray_arguments  # no Ray import: only the --ray options

    add_ray_arguments(parser)
    parser.set_defaults(func=run)


# -------------------------------------------------------------------------------------------- plan
@dataclass
class Job:
    index: int  # position in the sorted input list; image id = index + 1
    path: Path  # the image file as found
    rel: str  # POSIX path relative to the inputs' common folder (the file_name in the JSON)
    base: str  # POSIX output name stem relative to OUTDIR


def _root_of(item: str) -> Path:
    path = Path(os.path.expanduser(item))
    if path.is_dir():
        return path
    if path.is_file() or not any(c in item for c in "*?["):
        return path.parent
    parts = []
    for part in path.parts:
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def plan_jobs(inputs: Sequence[str], outdir: Path) -> List[Job]:
    """Expand the inputs into jobs with collision-free output names (images inside OUTDIR are ignored)."""
    from ..imageio import list_images

    out_abs = os.path.abspath(outdir)
    found: Dict[str, tuple] = {}
    for item in inputs:
        root = os.path.abspath(_root_of(item))
        for path in list_images([item]):
            absolute = os.path.abspath(path)
            if os.path.commonpath([absolute, out_abs]) != out_abs:
                found.setdefault(absolute, (path, root))
    if not found:
        raise FileNotFoundError(f"no input images outside the output folder '{outdir}'")
    roots = {root for _, root in found.values()}
    common = os.path.commonpath(sorted(roots))
    return name_jobs((Path(os.path.relpath(a, common)).as_posix(), found[a][0]) for a in found)


def name_jobs(sources) -> List[Job]:
    """Jobs for ``(rel, path)`` pairs (rel: POSIX path relative to the common folder), sorted by rel,
    with collision-free output names."""
    rels = sorted(sources)
    names = [rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel for rel, _ in rels]
    taken: Dict[str, int] = {}
    for name in names:
        taken[name.lower()] = taken.get(name.lower(), 0) + 1
    taken[COCO_FILE.rsplit(".", 1)[0]] = 2  # never write BASE.json over the COCO file
    bases, used = [], set()
    for (rel, _), name in zip(rels, names):
        base = name
        if taken[name.lower()] > 1:
            stem, _, ext = rel.rpartition(".")
            base = f"{stem}_{ext}" if stem else f"{rel}_"
        candidate, k = base, 2
        while candidate.lower() in used:
            candidate, k = f"{base}_{k}", k + 1
        used.add(candidate.lower())
        bases.append(candidate)
    return [Job(i, path, rel, base) for i, ((rel, path), base) in enumerate(zip(rels, bases))]


def output_files(base: str, formats: Sequence[str], overlay: bool) -> List[str]:
    files = []
    if "sa1b" in formats or "coco" in formats:
        files.append(f"{base}.json")
    if "png" in formats:
        files.append(f"{base}_labels.png")
    if "polygons" in formats:
        files += [f"{base}_polygons.json", f"{base}_yolo.txt"]
    if overlay:
        files.append(f"{base}_overlay.png")
    return files


# --------------------------------------------------------------------------------------- per image
def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    if getattr(args, "text", None) is not None:  # concept labelling: the generator options do not apply
        from .sam3_text import auto_phrases

        return {"model": str(args.model), "phrases": auto_phrases(args.text),
                "concept_threshold": args.concept_threshold, "polygon_tolerance": args.polygon_tolerance}
    settings = {dest: getattr(args, dest) for _, dest, *_ in GENERATOR_OPTIONS}
    settings.update(model=str(args.model), polygon_tolerance=args.polygon_tolerance, use_m2m=args.use_m2m,
                    multimask_output=not args.single_mask)
    if args.hq_token_only:
        settings["hq_token_only"] = True
    return settings


def _source_stamp(path: Path) -> Dict[str, int]:
    st = os.stat(path)
    return {"source_size": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns)}


def _finished(outdir: Path, job: Job, files: List[str], settings: Dict[str, Any],
              stamp: Optional[Dict[str, int]] = None) -> Optional[Dict[str, Any]]:
    """The marker of a finished image whose outputs are all there and still valid, else None.
    ``stamp``: the source's size and mtime when known (else read from ``job.path``)."""
    import json

    marker = outdir / MARKER_DIR / f"{job.base}.done.json"
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        ok = (data.get("version") == _MARKER_VERSION and data.get("source") == job.rel
              and data.get("settings") == settings and set(files) <= set(data.get("files", []))
              and all(data.get(k) == v for k, v in (stamp or _source_stamp(job.path)).items()))
    except (OSError, ValueError, AttributeError):
        return None
    return data if ok and all((outdir / f).is_file() for f in files) else None


def _draw_overlay(image, records):
    import numpy as np

    from ..formats import to_binary_mask
    from ..visualize import overlay_masks, palette

    colors = palette(len(records))
    order = sorted(range(len(records)), key=lambda i: -int(records[i]["area"]))
    chunk = max(1, _OVERLAY_PIXEL_BUDGET // max(1, image.shape[0] * image.shape[1]))
    out = image
    for start in range(0, len(order), chunk):  # largest first, a bounded number of masks at a time
        idx = order[start : start + chunk]
        masks = np.stack([to_binary_mask(records[i]["segmentation"]) for i in idx])
        out = overlay_masks(out, masks, colors=colors[idx])
    return out


def _write_outputs(outdir: Path, job: Job, image, records, args) -> List[str]:
    from ..atomic import write_bytes_atomic, write_json_atomic, write_png_atomic
    from ..formats import to_polygons_json, write_label_png, write_sa1b_json
    from ..polygons import to_yolo_seg_line

    h, w = image.shape[:2]
    info = dict(file_name=job.rel, width=w, height=h, image_id=job.index + 1)
    if "sa1b" in args.formats or "coco" in args.formats:
        write_sa1b_json(outdir / f"{job.base}.json", records, **info)
    if "png" in args.formats:
        write_label_png(outdir / f"{job.base}_labels.png", records, shape=(h, w))
    if "polygons" in args.formats:
        data = to_polygons_json(records, tolerance=args.polygon_tolerance, **info)
        write_json_atomic(outdir / f"{job.base}_polygons.json", data)
        lines = [to_yolo_seg_line(ann.get("category_id", 1) - 1, ann["polygons"], w, h) for ann in data["annotations"]]
        write_bytes_atomic(outdir / f"{job.base}_yolo.txt", "".join(f"{x}\n" for x in lines if x).encode())
    if not args.no_overlay:
        write_png_atomic(outdir / f"{job.base}_overlay.png", _draw_overlay(image, records))
    return output_files(job.base, args.formats, not args.no_overlay)


# -------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .. import __version__
    from ..atomic import write_json_atomic
    from ..formats import CocoBuilder, read_sa1b_json
    from ..imageio import load_image

    args.formats = sorted({f for group in (args.formats or [["sa1b"]]) for f in group}, key=FORMATS.index)
    if getattr(args, "ray", None) is not None:  # the same job on a Ray cluster (Ray imported only there)
        if getattr(args, "text", None) is not None:
            raise ValueError("--text (concept labelling with SAM 3) does not run with --ray yet: leave out --ray")
        from ..scale import run as run_on_ray

        return run_on_ray(args)
    outdir = Path(args.output)
    jobs = plan_jobs(args.inputs, outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)
    categories = None
    if args.text is not None:
        from .sam3_text import concept_categories

        categories = concept_categories(settings["phrases"])
    coco = CocoBuilder(segmentation=args.coco_segmentation, tolerance=args.polygon_tolerance,
                       categories=categories) if "coco" in args.formats else None
    generator = None
    processed = skipped = 0
    failed: List[str] = []

    def report(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    bar = tqdm(jobs, desc="segment everything" if args.text is None else "label by concept", unit="image", disable=args.no_progress, file=sys.stderr)
    try:
        for job in bar:
            files = output_files(job.base, args.formats, not args.no_overlay)
            done = None if args.overwrite else _finished(outdir, job, files, settings)
            if done is not None and coco is not None:
                try:  # the COCO file is rebuilt from the per-image SA-1B files
                    image_meta, records = read_sa1b_json(outdir / f"{job.base}.json", output_mode="coco_rle")
                    coco.add_image(records, file_name=job.rel, width=image_meta["width"],
                                   height=image_meta["height"], image_id=job.index + 1)
                except (OSError, ValueError, KeyError, TypeError):
                    done = None
            if done is not None:
                skipped += 1
                continue
            marker_path = outdir / MARKER_DIR / f"{job.base}.done.json"
            marker_path.unlink(missing_ok=True)  # outputs are about to change: not finished until rewritten
            try:
                stamp = _source_stamp(job.path)
                image = load_image(job.path)
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch
                failed.append(str(job.path))
                report(f"anyseg auto: failed: {job.path}: {exc}")
                continue
            if generator is None:  # loaded only when some image needs it; a bad model stops the run
                generator = _make_generator(args)
            try:
                records = generator.generate(image)
                written = _write_outputs(outdir, job, image, records, args)
                if coco is not None:
                    coco.add_image(records, file_name=job.rel, width=image.shape[1], height=image.shape[0],
                                   image_id=job.index + 1)
            except Exception as exc:  # noqa: BLE001
                failed.append(str(job.path))
                report(f"anyseg auto: failed: {job.path}: {exc}")
                continue
            marker = {"version": _MARKER_VERSION, "anyseg": __version__, "source": job.rel, **stamp,
                      "width": int(image.shape[1]), "height": int(image.shape[0]), "masks": len(records),
                      "files": written, "settings": settings}
            write_json_atomic(marker_path, marker, indent=1)
            processed += 1
            bar.set_postfix_str(f"{len(records)} masks", refresh=False)
    finally:
        bar.close()
        if coco is not None:
            coco.write(outdir / COCO_FILE)  # always consistent with the finished images
    print(f"anyseg auto: {processed} processed, {skipped} skipped (already done), {len(failed)} failed; "
          f"outputs in {outdir}")
    return 1 if failed else 0


def _make_generator(args: argparse.Namespace):
    from ..protocol import make_predictor, model_family

    model = load_model_from_args(args)
    family = model_family(model)
    if family == "sam3" or args.text is not None:
        from .sam3_text import ConceptLabeler

        if family != "sam3":
            raise ValueError(f"--text in anyseg auto labels by concept with a SAM 3 model (--model sam3); "
                             f"{args.model} is a {_FAMILY_NAMES.get(family, family)} model")
        if args.text is None:
            raise ValueError(f"{args.model} is a SAM 3 model: it labels by concept, give --text \"PHRASE[. PHRASE...]\"")
        if args.use_m2m or args.single_mask or args.hq_token_only:
            raise ValueError("--use-m2m, --single-mask and --hq-token-only do not apply to --text (SAM 3)")
        return ConceptLabeler(model, _settings(args)["phrases"], args.concept_threshold)
    options = {dest: getattr(args, dest) for _, dest, *_ in GENERATOR_OPTIONS}
    for dest, defaults in FAMILY_DEFAULTS.items():
        if options[dest] is None:
            options[dest] = defaults[family]
    if family == "sam2":
        options.update(use_m2m=args.use_m2m, multimask_output=not args.single_mask)
    elif args.use_m2m or args.single_mask:
        raise ValueError(f"--use-m2m and --single-mask apply to SAM 2 models only; {args.model} is a "
                         f"{_FAMILY_NAMES.get(family, family)} model")
    if args.hq_token_only:
        if not getattr(model, "is_hq", False):
            raise ValueError(f"--hq-token-only applies to HQ-SAM models only; {args.model} has no HQ token")
        options["hq_token_only"] = True
    return make_predictor(model).mask_generator(output_mode="coco_rle", **options)
