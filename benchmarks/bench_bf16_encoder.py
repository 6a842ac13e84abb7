"""Quality of a bfloat16 image encoder, with and without float32 modules, on the golden checkpoints.

For each golden checkpoint and each choice of encoder submodules kept in float32
(``SpeedConfig.encoder_float32``), prints the minimum mask IoU against the faithful float32 path over
the manifest's predictor cases on truck.jpg and dog.jpg (the quality bar is 0.98), and the share of
the encoder's convolution and linear-layer multiply-adds in each top-level submodule at 1024 x 1024
(counted with forward hooks), which bounds what a float32 module costs in speed.

On CPUs without native bfloat16 PyTorch emulates the products (inputs and outputs rounded to
bfloat16, float32 accumulation); the quality is what it measures here, the speed is not.

usage:
  ANYSEG_SHARED=../shared python benchmarks/bench_bf16_encoder.py [--shared DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Per golden model: the float32 choices timed (None: the SENSITIVE_MODULES default).
VARIANTS = {
    "mobilesam": [(), ("layers.3",), None],
    "vit_small": [None],
}


def multiply_add_shares(encoder, side: int = 1024):
    """Convolution + linear multiply-adds per top-level submodule (``layers.N`` kept apart)."""
    import torch

    counts = {}

    def hook(name):
        top = ".".join(name.split(".")[:2]) if name.startswith(("layers.", "blocks.")) else name.split(".")[0]

        def count(module, inputs, output):
            if isinstance(module, torch.nn.Conv2d):
                per_out = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            else:
                per_out = module.in_features
            counts[top] = counts.get(top, 0) + output.numel() * per_out
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in encoder.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.inference_mode():
            encoder(torch.zeros(1, 3, side, side))
    finally:
        for h in handles:
            h.remove()
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.environ.get("ANYSEG_SHARED"), help="folder with golden/ and images/")
    parser.add_argument("--quick", action="store_true", help="dog.jpg only")
    args = parser.parse_args(argv)
    if not args.shared or not (Path(args.shared) / "golden" / "manifest.json").exists():
        parser.error("needs the golden data: --shared DIR or ANYSEG_SHARED")
    shared = Path(args.shared)

    import torch

    import anyseg
    from anyseg.fast.quality import predictor_cases, predictor_quality
    from anyseg.speed import SpeedConfig, cpu_capabilities, float32_modules

    manifest = json.loads((shared / "golden" / "manifest.json").read_text())
    names = ["dog.jpg"] if args.quick else ["truck.jpg", "dog.jpg"]
    images = [anyseg.load_image(shared / "images" / n) for n in names]
    caps = cpu_capabilities()
    print(f"bfloat16 encoder quality, torch {torch.__version__}, ISA {caps['isa']}, native bf16 "
          f"{caps['bf16_matmul']}, images {', '.join(names)}")
    print("| model | float32 modules | min mask IoU vs faithful (worst case) |")
    print("|---|---|---:|")
    shares = {}
    for model_name, variants in VARIANTS.items():
        entry = manifest[model_name]
        model = anyseg.load_model(shared / "golden" / entry["checkpoint"])
        cases = [predictor_cases(entry, n) for n in names]
        for keep in variants:
            config = SpeedConfig.lossless(encoder_dtype=torch.bfloat16, encoder_float32=keep)
            kept = float32_modules(model, config)
            label = ", ".join(kept) or "none"
            if keep is None:
                label += " (default)"
            out = predictor_quality(model, config, images, cases)
            worst = min(out["per_case"], key=out["per_case"].get)
            print(f"| {model_name} | {label} | {out['min_iou']:.4f} ({worst}) |", flush=True)
        shares[model_name] = multiply_add_shares(model.image_encoder)
    for model_name, counts in shares.items():
        total = sum(counts.values())
        print(f"\n{model_name} encoder, convolution + linear multiply-adds at 1024 x 1024: {total / 1e9:.2f} G")
        print("| submodule | G multiply-adds | share |")
        print("|---|---:|---:|")
        for name, n in counts.items():
            print(f"| {name} | {n / 1e9:.2f} | {100 * n / total:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
