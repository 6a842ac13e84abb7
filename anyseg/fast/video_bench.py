"""Speed of SAM 2 video tracking, faithful against the fast paths of :mod:`anyseg.fast.sam2_video`:
frames per second and peak RSS tracking 1 and 4 objects (``benchmarks/bench_sam2_video.py`` and the
video rows of ``anyseg bench``).

Each configuration runs in a fresh subprocess (``python -m anyseg.fast.video_bench --child ...``) so
that its peak RSS is its own. The video is the golden 640 x 480 clip (``golden/sam2/clip``, 8 frames)
played forth and back to the requested length, so that the memory bank fills (steady state: every
frame from ``num_maskmem`` on reads seven memories). Objects are clicked on frame 0.

Models: ``golden`` (the golden SAM 2.1 checkpoint, a reduced model with real-size memory) and ``tiny``
(the public SAM 2.1 tiny architecture with random weights; zero-initialised embeddings perturbed as
for the golden checkpoint so that the outputs are not trivial). Speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

CLICKS = {1: [(288.0, 240.0)], 4: [(160.0, 120.0), (480.0, 120.0), (160.0, 360.0), (480.0, 360.0)]}


def default_shared() -> Optional[Path]:
    env = os.environ.get("ANYSEG_SHARED")
    if env:
        return Path(env)
    guess = Path(__file__).resolve().parents[3] / "shared"
    return guess if guess.is_dir() else None


def cpu_description() -> str:
    """CPU model, logical CPUs and the vector ISA / bf16 support PyTorch sees."""
    from ..speed import cpu_capabilities

    caps = cpu_capabilities()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{name}, {os.cpu_count()} logical CPUs, ISA {caps['isa']}, AMX {caps['amx']}, "
            f"AVX512-BF16 {caps['avx512_bf16']}")


def _clip_frames(shared: Path, num_frames: int):
    import numpy as np
    from PIL import Image

    folder = shared / "golden" / "sam2" / "clip"
    paths = sorted(folder.glob("*.jpg"), key=lambda p: int(p.stem))
    if not paths:
        raise FileNotFoundError(f"no golden clip frames in {folder}")
    clip = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    cycle = clip + clip[-2:0:-1] if len(clip) > 1 else clip
    return [cycle[i % len(cycle)] for i in range(num_frames)]


def build(model_kind: str, shared: Optional[Path]):
    import torch

    if model_kind == "golden":
        if shared is None:
            raise FileNotFoundError("the golden model needs the reference data folder (--shared or $ANYSEG_SHARED)")
        import anyseg

        g = shared / "golden" / "sam2"
        return anyseg.build_sam2_video_predictor(str(g / "sam2.1_golden.yaml"), str(g / "sam2.1_golden.pt")).model
    if model_kind == "tiny":
        from ..config_sam2 import sam2_config
        from ..modeling.sam2 import build_sam2_model

        torch.manual_seed(0)
        model = build_sam2_model(sam2_config("t").for_video()).eval()
        with torch.no_grad():
            for name in ("maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial"):
                p = getattr(model, name, None)
                if p is not None:
                    p.add_(0.3 * torch.randn_like(p))
        return model
    raise ValueError(f"unknown model {model_kind!r}: golden or tiny")


def measure(model_kind: str, objects: int, speed: str, num_frames: int, shared: Optional[Path],
            threads: Optional[int] = None) -> Dict:
    """Track ``objects`` objects through ``num_frames`` frames in this process; per-frame wall times."""
    import torch

    from ..video import SAM2VideoPredictor

    if threads:
        torch.set_num_threads(threads)
    if objects not in CLICKS:
        raise ValueError(f"objects must be one of {sorted(CLICKS)}")
    model = build(model_kind, shared)
    predictor = SAM2VideoPredictor(model, speed=None if speed == "faithful" else speed)
    frames = _clip_frames(shared, num_frames)
    t0 = time.perf_counter()
    state = predictor.init_state(frames)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k, (x, y) in enumerate(CLICKS[objects]):
        predictor.add_new_points_or_box(state, 0, k + 1, points=[[x, y]], labels=[1])
    click_s = (time.perf_counter() - t0) / objects
    times: List[float] = []
    last = time.perf_counter()
    for _ in predictor.propagate_in_video(state):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    state.close()
    steady_from = model.config.num_maskmem  # from here every frame reads a full memory bank
    steady = times[steady_from:]
    return dict(model=model_kind, objects=objects, speed=speed, frames=num_frames,
                fast_paths=None if predictor.speed is None else dict(
                    dataclasses.asdict(predictor.speed), dtype=str(predictor.speed.dtype)),
                frame_s=[round(t, 3) for t in times], first_encode_s=round(encode_s, 3),
                click_s=round(click_s, 3),
                avg_fps=round((len(times) - 1) / sum(times[1:]), 4) if len(times) > 1 else None,
                steady_s=round(statistics.median(steady), 3) if steady else None,
                steady_fps=round(1 / statistics.median(steady), 4) if steady else None,
                peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                threads=torch.get_num_threads())


def run_child(model_kind: str, objects: int, speed: str, num_frames: int, shared: Optional[Path],
              threads: Optional[int] = None) -> Dict:
    """:func:`measure` in a fresh subprocess (clean peak RSS)."""
    cmd = [sys.executable, "-m", "anyseg.fast.video_bench", "--child", "--model", model_kind,
           "--objects", str(objects), "--speed", speed, "--frames", str(num_frames)]
    if shared is not None:
        cmd += ["--shared", str(shared)]
    if threads:
        cmd += ["--threads", str(threads)]
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def speeds_for(device: str = "cpu") -> List[str]:
    """faithful, lossless, and auto where it differs from lossless (native bfloat16)."""
    from .sam2_video import native_bf16

    return ["faithful", "lossless"] + (["auto"] if native_bf16(device) else [])


def video_rows(models: Sequence[str] = ("golden", "tiny"), objects: Sequence[int] = (1, 4),
               speeds: Optional[Sequence[str]] = None, num_frames: int = 16, shared: Optional[Path] = None,
               threads: Optional[int] = None, repeats: int = 1,
               log: Callable[[str], None] = lambda s: None) -> List[Dict]:
    """One row per (model, objects, speed): each configuration in its own subprocess. With
    ``repeats`` > 1 the configurations of a (model, objects) pair alternate, and the row keeps the
    median of the steady-state and average frames/s."""
    shared = shared if shared is not None else default_shared()
    speeds = list(speeds) if speeds else speeds_for()
    rows = []
    for model_kind in models:
        for n in objects:
            runs: Dict[str, List[Dict]] = {s: [] for s in speeds}
            for r in range(repeats):
                for speed in speeds:
                    log(f"video {model_kind} {n} object(s) {speed} (run {r + 1}/{repeats})")
                    res = run_child(model_kind, n, speed, num_frames, shared, threads)
                    log(f"  steady {res['steady_s']} s/frame, average {res['avg_fps']} frames/s, "
                        f"peak RSS {res['peak_rss_mib']} MiB")
                    runs[speed].append(res)
            base = None
            for speed in speeds:
                rs = runs[speed]
                row = dict(rs[-1])
                row["steady_fps"] = statistics.median(x["steady_fps"] for x in rs)
                row["avg_fps"] = statistics.median(x["avg_fps"] for x in rs)
                row["steady_s_runs"] = [x["steady_s"] for x in rs]
                row["peak_rss_mib"] = max(x["peak_rss_mib"] for x in rs)
                if speed == "faithful":
                    base = row
                row["speedup"] = None if base is None else row["steady_fps"] / base["steady_fps"]
                rows.append(row)
    return rows


def markdown(rows: Sequence[Dict]) -> str:
    lines = ["| model | objects | config | steady frames/s | s/frame (steady, per run) | average frames/s "
             "| speed-up (steady) | peak RSS (MiB) |",
             "|---|---:|---|---:|---|---:|---:|---:|"]
    for r in rows:
        speedup = "" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        per_run = ", ".join(f"{s:.2f}" for s in r.get("steady_s_runs", [r["steady_s"]]))
        lines.append(f"| {r['model']} | {r['objects']} | {r['speed']} | {r['steady_fps']:.3f} | {per_run} "
                     f"| {r['avg_fps']:.3f} | {speedup} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def header(num_frames: int) -> str:
    import torch

    return (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu_description()}, torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.1f}; golden clip played forth and back to {num_frames} frames, "
            f"steady state = from frame num_maskmem (7) on (full memory bank).")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["golden", "tiny"], choices=("golden", "tiny"))
    parser.add_argument("--objects", nargs="+", type=int, default=[1, 4], choices=sorted(CLICKS))
    parser.add_argument("--speeds", nargs="+", default=None, choices=("faithful", "lossless", "auto"),
                        help="default: faithful, lossless, and auto where the CPU has native bfloat16")
    parser.add_argument("--frames", type=int, default=16, help="frames tracked (default 16)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per configuration")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shared", default=None, help="reference data folder (default $ANYSEG_SHARED or ../shared)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="golden", help=argparse.SUPPRESS)
    parser.add_argument("--speed", default="faithful", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shared = Path(args.shared) if args.shared else default_shared()
    if args.child:
        res = measure(args.model, args.objects[0], args.speed, args.frames, shared, args.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    print(header(args.frames), flush=True)
    rows = video_rows(args.models, args.objects, args.speeds, args.frames, shared, args.threads, args.repeats,
                      log=lambda s: print("# " + s, file=sys.stderr, flush=True))
    print()
    print(markdown(rows))
    if args.json:
        from ..atomic import write_json_atomic

        write_json_atomic(args.json, {"header": header(args.frames), "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def bench_section(quick: bool = False, shared: Optional[Path] = None, threads: Optional[int] = None,
                  repeats: Optional[int] = None, log: Callable[[str], None] = lambda s: None) -> Dict:
    """The ``sam2_video`` rows of ``anyseg bench``: golden and tiny models, 1 and 4 objects, faithful
    against the fast paths (``quick``: 10 frames instead of 16)."""
    num_frames = 10 if quick else 16
    rows = video_rows(("golden", "tiny"), (1, 4), None, num_frames, shared, threads, repeats or 1, log=log)
    text = "### SAM 2 video tracking\n\n" + header(num_frames) + "\n\n" + markdown(rows)
    return {"task": "sam2_video", "rows": rows, "markdown": text}
