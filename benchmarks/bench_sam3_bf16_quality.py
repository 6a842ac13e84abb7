"""Quality of SAM 3's bfloat16 ViT trunk (the ``auto`` preset where bfloat16 is native) against the
reference float32 computation, on every golden SAM 3 case: detections per case, the worst mask IoU of a
reference detection against its best bfloat16 match, the largest score difference, and CPU seconds.

    python benchmarks/bench_sam3_bf16_quality.py [--shared ../shared]

On a CPU without native bfloat16 the trunk's products are emulated: the numbers are the same kind, the
time is not representative.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def run_image(processor, state_image, entry):
    state = processor.set_image(state_image)
    out = {}
    for case in entry["cases"]:
        processor.replay(case["calls"], state)
        out[case["name"]] = (state["scores"].numpy().copy(), state["masks"].numpy()[:, 0].copy())
    return out


def main() -> int:
    import anyseg
    from anyseg import Sam3Processor
    from anyseg.fast.quality import mask_iou
    from anyseg.protocol import apply_speed
    from anyseg.speed import SpeedConfig, cpu_capabilities

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=os.environ.get("ANYSEG_SHARED", "../shared"))
    args = parser.parse_args()
    golden, images = Path(args.shared) / "golden" / "sam3", Path(args.shared) / "images"
    manifest = json.loads((golden / "manifest.json").read_text())
    model = anyseg.load_model(golden / "sam3_checkpoint.pt")
    native = cpu_capabilities()["bf16_matmul"]
    print(f"SAM 3 bfloat16 trunk vs float32, golden checkpoint; native bfloat16: {native}")
    print("| image | case | detections fp32 / bf16 | worst mask IoU | max score diff |")
    print("|---|---|---:|---:|---:|")
    times = {"float32": 0.0, "bfloat16": 0.0}
    for entry in manifest["images"]:
        image = Image.open(images / entry["image"])
        results = {}
        for name, speed in (("float32", "faithful"), ("bfloat16", SpeedConfig.lossless(encoder_dtype=torch.bfloat16))):
            apply_speed(model, speed)
            t0 = time.process_time()
            results[name] = run_image(Sam3Processor(model, resolution=1008, confidence_threshold=0.5), image, entry)
            times[name] += time.process_time() - t0
        for case, (s0, m0) in results["float32"].items():
            s1, m1 = results["bfloat16"][case]
            ious = [max([mask_iou(a, b) for b in m1] or [0.0]) for a in m0]
            diff = [float(np.min(np.abs(s1 - s))) if len(s1) else float("inf") for s in s0]
            print(f"| {entry['image']} | {case} | {len(s0)} / {len(s1)} | {min(ious or [1.0]):.4f} | "
                  f"{max(diff or [0.0]):.1e} |")
    apply_speed(model, "faithful")
    print(f"\nCPU seconds (set_image and every case, both images): float32 {times['float32']:.1f}, "
          f"bfloat16 {times['bfloat16']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
