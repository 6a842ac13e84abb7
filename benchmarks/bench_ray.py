"""Segment everything on Ray: images/s with 1 and 2 model workers against local ``anyseg auto``.

    python benchmarks/bench_ray.py                                  # golden vit_small, 8 images, 8 x 8 grid
    python benchmarks/bench_ray.py --model nano --images 16
    python benchmarks/bench_ray.py --model vit_b --points-per-side 32 --workers 1 2 4

Every configuration runs the same ``anyseg auto`` command on the same images into a fresh output folder
(SA-1B JSON only, no overlay). Local mode uses all the CPUs in one process; the Ray rows use a local Ray
instance with as many CPUs, started once beforehand (its start-up time is printed apart), and split the
CPUs between the workers (``--cpus-per-worker`` = CPUs / workers, also their torch thread count).
Times are wall-clock for the whole command, model loading and actor start-up included, so the overhead
column is what a user sees on a small job; it shrinks as the job grows. Needs ``pip install "anyseg[ray]"``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyseg.cli import main as cli  # noqa: E402

SHARED = Path(os.environ.get("ANYSEG_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def make_images(folder: Path, count: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    source = SHARED / "images" / "groceries.jpg"
    if source.is_file():
        with Image.open(source) as im:
            base = im.convert("RGB")
    else:  # synthetic stand-in when the shared images are not there
        import numpy as np

        base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (534, 800, 3), dtype=np.uint8))
    for i in range(count):
        x, y = (37 * i) % max(1, base.width - size), (23 * i) % max(1, base.height - size)
        base.crop((x, y, x + size, y + size * 3 // 4)).save(folder / f"img{i:03d}.png")


def timed(argv) -> tuple:
    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        status = cli(argv)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"anyseg auto failed ({status}):\n{err.getvalue()[-2000:]}")
    return elapsed, out.getvalue().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    golden = SHARED / "golden" / "vit_small_checkpoint.pth"
    parser.add_argument("--model", default=str(golden) if golden.is_file() else "nano")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="image width in pixels (height 3/4 of it)")
    parser.add_argument("--points-per-side", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import ray
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    make_images(tmp / "in", args.images, args.size)
    common = [str(tmp / "in"), "-m", args.model, "--points-per-side", str(args.points_per_side), "--no-progress",
              "--no-overlay"]
    torch.set_num_threads(args.cpus)
    rows = []
    local_s, summary = timed(["auto", *common, "-o", str(tmp / "local")])
    rows.append(("local (1 process)", args.cpus, local_s, summary))

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance on this machine
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    try:
        for workers in args.workers:
            cpus = args.cpus / workers
            elapsed, summary = timed(["auto", *common, "-o", str(tmp / f"ray{workers}"), "--ray", "--workers",
                                      str(workers), "--cpus-per-worker", f"{cpus:g}"])
            rows.append((f"Ray, {workers} worker{'s' * (workers > 1)}", cpus, elapsed, summary))
    finally:
        ray.shutdown()

    print(f"# anyseg auto on {args.images} images of {args.size} x {args.size * 3 // 4} px, "
          f"{args.points_per_side} x {args.points_per_side} points, model {Path(args.model).name}")
    print(f"# {platform.processor() or platform.machine()}, {args.cpus} CPUs, torch {torch.__version__}, "
          f"ray {ray.__version__}; Ray start-up {ray_start:.1f} s (not in the rows); load average at the end "
          f"{os.getloadavg()[0]:.1f} (other work on the machine slows every row)")
    print(f"| {'mode':<20} | CPUs/worker | wall s | images/s | overhead vs local |")
    print(f"|{'-' * 22}|-------------|--------|----------|-------------------|")
    for name, cpus, elapsed, _ in rows:
        overhead = f"{(elapsed / local_s - 1) * 100:+.0f} %" if not name.startswith("local") else "-"
        print(f"| {name:<20} | {cpus:>11g} | {elapsed:6.1f} | {args.images / elapsed:8.3f} | {overhead:>17} |")
    for name, _, _, summary in rows:
        print(f"# {name}: {summary.split(';')[0]}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
