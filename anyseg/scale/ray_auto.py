"""``anyseg auto --ray``: segment everything on Ray Data, with the same outputs as the local command.

Pipeline (one Ray Data dataset over the images still to do):

1. the driver lists the inputs (:mod:`anyseg.scale.sources`), numbers and names them exactly as the local
   command, and skips images whose finished-marker is valid (resume);
2. ``map`` in CPU tasks: read the file (local path or pyarrow file system) and decode it; a file that
   cannot be read or decoded becomes an error record;
3. ``map_batches`` with :class:`Segmenter`, a callable class run in a pool of actors
   (``ActorPoolStrategy``) that load the model once: each image is segmented and its files written
   from the worker, each atomically, with the local command's own writer; then the image's Parquet
   fragment and last its marker;
4. the driver streams the small per-image result rows (progress: images/s, masks/s), then rebuilds the
   COCO file (if asked) and ``OUTDIR/masks.parquet`` from the finished images, atomically, and prints
   the local command's summary line.

A dead actor is replaced (``max_restarts``) and its images are retried (``max_task_retries``); writes
are atomic and the marker comes last, so a retried or restarted image is written again whole and the
index holds each image once.
"""
from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import ray

from ..cli import auto
from . import sources

INDEX_FILE = "masks.parquet"
FRAGMENT_DIR = f"{auto.MARKER_DIR}/index"  # one Parquet file per finished image, merged into INDEX_FILE

#: One row per mask. ``segmentation`` is the COCO RLE (``size`` = [height, width], compressed ``counts``).
INDEX_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("mask_index", pa.int32()),  # position of the mask among its image's masks (the generator's order)
    ("segmentation", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
    ("bbox", pa.list_(pa.float64())),  # XYWH, as in the SA-1B files
    ("area", pa.int64()),
    ("predicted_iou", pa.float64()),
    ("stability_score", pa.float64()),
    ("point_coords", pa.list_(pa.list_(pa.float64()))),
    ("crop_box", pa.list_(pa.float64())),
])


def fragment_name(base: str) -> str:
    return f"{FRAGMENT_DIR}/{base}.parquet"


def index_table(records: List[Dict[str, Any]], *, image_id: int, file_name: str) -> pa.Table:
    """The index rows of one image's generator records (``coco_rle`` output mode)."""
    from ..formats import to_coco_rle

    rows: Dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    for i, record in enumerate(records):
        rle = to_coco_rle(record["segmentation"])
        counts = rle["counts"]
        rows["image_id"].append(int(image_id))
        rows["file_name"].append(file_name)
        rows["mask_index"].append(i)
        rows["segmentation"].append({"size": [int(s) for s in rle["size"]],
                                     "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
        rows["bbox"].append([float(v) for v in record["bbox"]])
        rows["area"].append(int(record["area"]))
        rows["predicted_iou"].append(float(record["predicted_iou"]))
        rows["stability_score"].append(float(record["stability_score"]))
        rows["point_coords"].append([[float(v) for v in p] for p in record.get("point_coords", [])])
        rows["crop_box"].append([float(v) for v in record.get("crop_box", [])])
    return pa.table(rows, schema=INDEX_SCHEMA)


def _write_parquet_atomic(path: Path, tables) -> int:
    """Write tables (an iterable, one row group or more each) into one Parquet file atomically."""
    import pyarrow.parquet as pq

    from ..atomic import atomic_write

    rows = 0
    with atomic_write(path, "wb") as handle:
        with pq.ParquetWriter(handle, INDEX_SCHEMA) as writer:
            for table in tables:
                writer.write_table(table)
                rows += table.num_rows
            if rows == 0:
                writer.write_table(INDEX_SCHEMA.empty_table())
    return rows


def _remove_stale_temps(outdir: Path, names: List[str]) -> None:
    """Temporary files left by a writer that was killed mid-write (atomic.py names them .NAME.tmp-XXXXXXXX)."""
    for name in names:
        target = outdir / name
        for stale in glob.glob(glob.escape(str(target.parent / f".{target.name}.tmp-")) + "*"):
            try:
                os.unlink(stale)
            except OSError:
                pass


# ------------------------------------------------------------------------------------- Ray stages
def decode(row: Dict[str, Any]) -> Dict[str, Any]:
    """CPU task: read and decode one image; a bad file becomes an error record (``error`` set)."""
    from ..imageio import load_image

    out = dict(row)
    out.update(pixels=b"", height=0, width=0, error="")
    try:
        data = sources.read_uri(row["uri"]) if row["uri"] else Path(row["location"]).read_bytes()
        image = load_image(data)
        out.update(pixels=image.tobytes(), height=int(image.shape[0]), width=int(image.shape[1]))
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch
        out["error"] = str(exc) or type(exc).__name__
    return out


class Segmenter:
    """Callable class for ``map_batches``: one per actor, loads the model once, writes each image's files."""

    def __init__(self, options: Dict[str, Any], outdir: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.args = argparse.Namespace(**options)
        self.outdir = Path(outdir)
        self.settings = auto._settings(self.args)
        self.generator = auto._make_generator(self.args)  # a bad model fails here, before any image

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        out: Dict[str, list] = {"index": [], "masks": [], "error": []}
        for i in range(len(batch["index"])):
            masks, error = self._one({key: batch[key][i] for key in batch})
            out["index"].append(int(batch["index"][i]))
            out["masks"].append(masks)
            out["error"].append(error)
        return {"index": np.array(out["index"], dtype=np.int64), "masks": np.array(out["masks"], dtype=np.int64),
                "error": np.array(out["error"], dtype=object)}

    def _one(self, row: Dict[str, Any]):
        from .. import __version__
        from ..atomic import write_json_atomic

        if row["error"]:
            return 0, str(row["error"])
        job = auto.Job(int(row["index"]), Path(str(row["location"])), str(row["rel"]), str(row["base"]))
        fragment = fragment_name(job.base)
        files = auto.output_files(job.base, self.args.formats, not self.args.no_overlay)
        marker_path = self.outdir / auto.MARKER_DIR / f"{job.base}.done.json"
        marker_path.unlink(missing_ok=True)
        _remove_stale_temps(self.outdir, files + [fragment, str(marker_path.relative_to(self.outdir))])
        try:
            h, w = int(row["height"]), int(row["width"])
            image = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(h, w, 3).copy()
            records = self.generator.generate(image)
            written = auto._write_outputs(self.outdir, job, image, records, self.args)
            _write_parquet_atomic(self.outdir / fragment,
                                  [index_table(records, image_id=job.index + 1, file_name=job.rel)])
        except Exception as exc:  # noqa: BLE001 - reported as a failed image, the run goes on
            return 0, str(exc) or type(exc).__name__
        stamp = {"source_size": int(row["source_size"]), "source_mtime_ns": int(row["source_mtime_ns"])}
        marker = {"version": auto._MARKER_VERSION, "anyseg": __version__, "source": job.rel, **stamp,
                  "width": w, "height": h, "masks": len(records), "files": written + [fragment],
                  "settings": self.settings}
        write_json_atomic(marker_path, marker, indent=1)
        return len(records), ""


# -------------------------------------------------------------------------------------------- driver
def _connect(address: str, quiet: bool) -> bool:
    """Connect to (or start) Ray; returns whether this call did, so that the run shuts it down again."""
    if ray.is_initialized():
        return False
    kwargs: Dict[str, Any] = {"log_to_driver": not quiet, "logging_level": logging.WARNING}
    if address == "local":
        ray.init(include_dashboard=False, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


def _default_workers(args: argparse.Namespace) -> int:
    resources = ray.cluster_resources()
    if args.gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) / args.gpus_per_worker))
    cpus = resources.get("CPU", 1)
    return max(1, int(cpus // max(args.cpus_per_worker, 1e-9)))


def _unwrap(exc: BaseException) -> BaseException:
    """The user error (bad model, bad option) inside Ray's wrappers, if there is one."""
    seen = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ValueError, FileNotFoundError)) and not type(cur).__module__.startswith("ray"):
            return cur
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    return exc


def _actor_init_failure(exc: BaseException) -> str:
    """The error line of a model actor whose constructor raised (bad model or option), else ''."""
    seen = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if getattr(cur, "actor_init_failed", False) or "creation task" in str(cur):
            lines = [ln.strip() for ln in str(cur).splitlines() if "Error: " in ln]
            return lines[-1] if lines else str(cur).splitlines()[0]
        cur = cur.__cause__ or cur.__context__
    return ""


def run_ray(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..formats import CocoBuilder, read_sa1b_json

    outdir = Path(args.output)
    if sources.is_uri(str(args.output)):
        raise ValueError(f"-o {args.output}: --ray writes to a folder (on a multi-node cluster a shared file "
                         f"system mounted at the same path on every node), not to a URI")
    if args.gpus_per_worker > 0 and args.device == "cpu":
        raise ValueError("--gpus-per-worker with --device cpu: drop one of them")
    from ..hub import _looks_like_path

    model = str(args.model)
    if _looks_like_path(model) and not str(args.ray).startswith("ray://") and not Path(model).expanduser().is_file():
        # caught here rather than in every actor; a Ray Client driver may not see the workers' files
        raise FileNotFoundError(f"checkpoint file not found: {model} (with --ray, every node needs it at this path)")
    items = sources.plan_sources(args.inputs, outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    outdir = outdir.resolve()
    settings = auto._settings(args)
    overlay = not args.no_overlay

    def required(base: str) -> List[str]:
        return auto.output_files(base, args.formats, overlay) + [fragment_name(base)]

    todo = [s for s in items if args.overwrite
            or auto._finished(outdir, s.job, required(s.job.base), settings, stamp=s.stamp) is None]
    skipped = len(items) - len(todo)
    for s in todo:  # outputs are about to change: not finished until rewritten
        (outdir / auto.MARKER_DIR / f"{s.job.base}.done.json").unlink(missing_ok=True)

    failed: List[str] = []
    processed = masks_total = 0
    started = time.perf_counter()
    if todo:
        processed, masks_total = _run_pipeline(args, outdir, todo, failed, tqdm)
    elapsed = time.perf_counter() - started

    # Rebuilt from the finished images among the inputs, as the local command rebuilds the COCO file.
    coco = CocoBuilder(segmentation=args.coco_segmentation, tolerance=args.polygon_tolerance) \
        if "coco" in args.formats else None
    fragments = []
    for s in items:
        if auto._finished(outdir, s.job, required(s.job.base), settings, stamp=s.stamp) is None:
            continue
        fragments.append(outdir / fragment_name(s.job.base))
        if coco is not None:
            image_meta, records = read_sa1b_json(outdir / f"{s.job.base}.json", output_mode="coco_rle")
            coco.add_image(records, file_name=s.job.rel, width=image_meta["width"], height=image_meta["height"],
                           image_id=s.job.index + 1)
    if coco is not None:
        coco.write(outdir / auto.COCO_FILE)
    _merge_index(outdir / INDEX_FILE, fragments)
    if processed:
        print(f"anyseg auto: {processed} images, {masks_total} masks in {elapsed:.1f} s "
              f"({processed / elapsed:.2f} images/s, {masks_total / elapsed:.1f} masks/s) on Ray", file=sys.stderr)
    print(f"anyseg auto: {processed} processed, {skipped} skipped (already done), {len(failed)} failed; "
          f"outputs in {args.output}")
    return 1 if failed else 0


def _merge_index(path: Path, fragments: List[Path], group: int = 512) -> None:
    """OUTDIR/masks.parquet from the per-image fragments, in image order, a bounded number at a time."""
    import pyarrow.parquet as pq

    def tables():
        for start in range(0, len(fragments), group):
            chunk = [pq.read_table(f, schema=INDEX_SCHEMA) for f in fragments[start : start + group]]
            table = pa.concat_tables(chunk) if chunk else INDEX_SCHEMA.empty_table()
            if table.num_rows:
                yield table

    _write_parquet_atomic(path, tables())


def _run_pipeline(args, outdir: Path, todo, failed: List[str], tqdm) -> tuple:
    quiet = bool(args.no_progress)
    owns = _connect(args.ray, quiet)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one progress line of our own (images/s, masks/s) instead
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        workers = args.workers or _default_workers(args)
        options = {k: v for k, v in vars(args).items() if k != "func"}
        rows = [{"index": s.job.index, "location": s.location, "uri": s.uri or "", "rel": s.job.rel,
                 "base": s.job.base, **s.stamp} for s in todo]
        # Small blocks: a block is the unit that is retried when its actor dies (retried images are rewritten whole).
        blocks = min(len(rows), max(16 * workers, min(len(rows) // 8, 20_000)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        # Decoding is light next to the model: a quarter CPU per task where the actors leave that much
        # free, else none (a cluster whose CPUs all go to actors would otherwise never decode anything).
        free = ray.cluster_resources().get("CPU", 0) - workers * args.cpus_per_worker
        ds = ds.map(decode, num_cpus=0.25 if free >= 0.25 else 0)
        remote: Dict[str, Any] = {"max_restarts": args.max_restarts, "max_task_retries": args.max_task_retries}
        if args.gpus_per_worker > 0:
            remote["num_gpus"] = args.gpus_per_worker
        with warnings.catch_warnings():  # restart and retry settings have no named parameter (Ray 2.60)
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = _segment_stage(ds, args, options, outdir, workers, remote)
        by_index = {s.job.index: s for s in todo}
        processed = masks_total = 0
        started = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"segment everything (Ray, {workers} worker{'s' * (workers > 1)})", unit="image",
                   disable=quiet, file=sys.stderr)
        try:
            for row in ds.iter_rows():
                bar.update(1)
                source = by_index[int(row["index"])]
                if row["error"]:
                    failed.append(source.location)
                    tqdm.write(f"anyseg auto: failed: {source.location}: {row['error']}", file=sys.stderr)
                    continue
                processed += 1
                masks_total += int(row["masks"])
                seconds = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{processed / seconds:.2f} images/s, {masks_total / seconds:.1f} masks/s",
                                    refresh=False)
        except Exception as exc:  # noqa: BLE001
            cause = _unwrap(exc)
            if cause is not exc:
                raise cause from exc
            failure = _actor_init_failure(exc)
            if failure:
                raise ValueError(f"the model workers could not start: {failure}") from exc
            raise
        finally:
            bar.close()
        return processed, masks_total
    finally:
        if owns:
            ray.shutdown()


def _segment_stage(ds, args, options, outdir: Path, workers: int, remote: Dict[str, Any]):
    return ds.map_batches(
        Segmenter, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs={"options": options, "outdir": str(outdir),
                               "threads": max(1, math.floor(args.cpus_per_worker))},
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=args.cpus_per_worker, **remote)
