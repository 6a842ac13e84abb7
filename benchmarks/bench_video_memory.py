"""Peak memory of SAM 2 video tracking against the length of the video (100, 1,000, 10,000 frames).

anyseg decodes frames on demand and keeps in memory only what the memory attention can still read
(conditioning frames, the last ``num_maskmem`` memories, the last object pointers); older outputs are
spilled to a temporary folder. Peak RSS should therefore not grow with the number of frames. The
reference instead preloads every frame (``S x S x 3`` float32) and keeps every output of every object;
the table puts what that would hold next to the measurements, computed for the model used here and for
the public models (S = 1024), and measures ``keep_all_outputs=True`` (every output in memory, frames still
decoded on demand) where it fits.

To make 10,000 frames feasible on a CPU the model is a small random-weight SAM 2.1 (image size 128,
a Hiera trunk of width 8 with one block per stage, one memory-attention layer with a 256-wide
feed-forward, one fuser block; decoder and memory widths as public: 256 / 64) on generated 64 x 48
frames with a moving square, one object clicked on frame 0. What is measured is the storage policy,
which does not depend on the model's size (the per-frame records scale with S^2; see the table).

Each configuration runs in its own subprocess so that peak RSS is clean.

    python benchmarks/bench_video_memory.py                      # 100, 1000, 10000 frames
    python benchmarks/bench_video_memory.py --frames 100 1000 --keep-all-max 1000 --objects 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
IMAGE_SIZE = 128
FRAME_W, FRAME_H = 64, 48


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def small_config():
    from anyseg.config_sam2 import (HieraConfig, MemoryAttentionConfig, MemoryEncoderConfig, NeckConfig,
                                    Sam2Config)

    trunk = HieraConfig(embed_dim=8, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=(2,),
                        window_spec=(4, 4, 2, 1), window_pos_embed_bkg_spatial_size=(4, 4))
    return Sam2Config(trunk=trunk, neck=NeckConfig(backbone_channel_list=trunk.channel_list), image_size=IMAGE_SIZE,
                      memory_attention=MemoryAttentionConfig(num_layers=1, dim_feedforward=256, feat_sizes=(8, 8)),
                      memory_encoder=MemoryEncoderConfig(fuser_num_layers=1)).for_video()


def build_model():
    import torch

    from anyseg.modeling.sam2 import build_sam2_model

    torch.manual_seed(0)
    model = build_sam2_model(small_config()).eval()
    with torch.no_grad():
        # Zero-initialised embeddings perturbed, as for the golden checkpoint, so outputs are not trivial.
        for name in ("maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial"):
            p = getattr(model, name, None)
            if p is not None:
                p.add_(0.3 * torch.randn_like(p))
    return model


def synthetic_source(num_frames: int):
    """Generated frames (a square moving over a gradient), made when asked for: nothing is held."""
    from anyseg.video.frames import FrameSource

    class SyntheticFrames(FrameSource):
        def __init__(self) -> None:
            super().__init__(image_size=IMAGE_SIZE, lookahead=2)
            self.num_frames = num_frames
            self.height, self.width = FRAME_H, FRAME_W

        def _decode(self, index: int) -> np.ndarray:
            yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W]
            frame = np.empty((FRAME_H, FRAME_W, 3), np.uint8)
            frame[..., 0] = (xx * 4) % 256
            frame[..., 1] = (yy * 5) % 256
            frame[..., 2] = 64
            x0 = 8 + int(20 * (1 + np.sin(index / 50.0)))
            y0 = 8 + int(10 * (1 + np.cos(index / 70.0)))
            frame[y0:y0 + 16, x0:x0 + 16] = 250
            return frame

    return SyntheticFrames()


def child(args) -> None:
    import torch

    from anyseg.video import SAM2VideoPredictor

    torch.set_num_threads(args.threads)
    model = build_model()
    predictor = SAM2VideoPredictor(model, keep_all_outputs=args.mode == "keep_all", speed=args.speed)
    state = predictor.init_state(synthetic_source(args.frames))
    for k in range(args.objects):
        predictor.add_new_points_or_box(state, 0, k + 1, points=[[16 + 8 * k, 16]], labels=[1])
    after_init = rss_mib()
    samples = []
    marks = sorted({max(1, args.frames * q // 10) for q in range(1, 11)})
    start = time.perf_counter()
    n = 0
    for frame_idx, obj_ids, masks in predictor.propagate_in_video(state):
        (masks > 0).any()  # what a caller does with the masks (write them, encode RLE) is not held here
        n += 1
        if n in marks:
            samples.append((n, round(rss_mib(), 1)))
    elapsed = time.perf_counter() - start
    spilled = 0
    if state.spill is not None and state.spill._path is not None:
        spilled = sum(f.stat().st_size for f in Path(state.spill.path).iterdir())
    result = dict(frames=args.frames, mode=args.mode, objects=args.objects, speed=args.speed or "faithful",
                  peak_rss_mib=round(peak_rss_mib(), 1), rss_after_prompt_mib=round(after_init, 1),
                  rss_samples=samples, seconds=round(elapsed, 1), spilled_mib=round(spilled / 2**20, 1))
    state.close()
    print("RESULT " + json.dumps(result), flush=True)


def reference_mib(frames: int, objects: int, image_size: int, mem_dim: int = 64, stride: int = 16) -> float:
    """What the reference's approach holds: every frame at S x S x 3 float32, plus per object and frame
    the bfloat16 memory features, the float32 low-res logits, the pointer and the score."""
    g = image_size // stride
    per_frame = 3 * image_size ** 2 * 4
    per_output = mem_dim * g * g * 2 + (image_size // 4) ** 2 * 4 + 256 * 4 + 4
    return (frames * per_frame + frames * objects * per_output) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--objects", type=int, default=1)
    parser.add_argument("--keep-all-max", type=int, default=10000,
                        help="largest video also measured with keep_all_outputs=True (0: never)")
    parser.add_argument("--speed", default=None, help="SAM2VideoPredictor speed (default: faithful)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="spill", choices=("spill", "keep_all"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        (n,) = args.frames
        args.frames = n
        child(args)
        return 0

    import torch

    from anyseg.speed import cpu_capabilities

    caps = cpu_capabilities()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu}, {os.cpu_count()} CPUs, ISA {caps['isa']}, "
          f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}; "
          f"model: SAM 2.1 reduced (image size {IMAGE_SIZE}), {args.objects} object(s), "
          f"frames {FRAME_W}x{FRAME_H}, speed {args.speed or 'faithful'}", flush=True)
    rows = []
    for n in args.frames:
        modes = ["spill"] + (["keep_all"] if n <= args.keep_all_max else [])
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", "--frames", str(n), "--mode", mode,
                   "--objects", str(args.objects), "--threads", str(args.threads)]
            if args.speed:
                cmd += ["--speed", args.speed]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"frames {n} {mode}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            res = json.loads(line[len("RESULT "):])
            rows.append(res)
            print(f"# {n} frames, {mode}: peak {res['peak_rss_mib']} MiB, {res['seconds']} s, "
                  f"RSS samples {res['rss_samples']}", flush=True)
    print()
    print("| frames | outputs | peak RSS (MiB) | RSS after the prompt | RSS at 10% / 100% of the frames | spilled to disk "
          "| s / frame | reference approach, this model (MiB) | reference approach, S = 1024 (MiB) |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        s = r["rss_samples"]
        print(f"| {r['frames']} | {'spilled' if r['mode'] == 'spill' else 'all in memory'} | {r['peak_rss_mib']:.0f} "
              f"| {r['rss_after_prompt_mib']:.0f} | {s[0][1]:.0f} / {s[-1][1]:.0f} | {r['spilled_mib']:.0f} MiB "
              f"| {r['seconds'] / r['frames']:.3f} "
              f"| {reference_mib(r['frames'], r['objects'], IMAGE_SIZE):,.0f} "
              f"| {reference_mib(r['frames'], r['objects'], 1024):,.0f} |")
    spill = [r for r in rows if r["mode"] == "spill"]
    if len(spill) > 1:
        lo, hi = min(r["peak_rss_mib"] for r in spill), max(r["peak_rss_mib"] for r in spill)
        print(f"\npeak RSS with spilling: {lo:.0f}-{hi:.0f} MiB ({(hi - lo) / lo:.1%} spread over "
              f"{spill[0]['frames']}-{spill[-1]['frames']} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
