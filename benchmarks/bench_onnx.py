"""CPU latency of the ONNX graphs (float32, int8 weights, int8 dynamic) next to the faithful torch path.

Times, on one image (default: the golden MobileSAM checkpoint on dog.jpg, 800 x 534):
  encoder  set_image: PIL resize + normalise/pad + image encoder  -> 1 x 256 x 64 x 64
  decoder  predict: one click, three masks, upscaled to the original size
Prints a table (median and best of the repeats, milliseconds) and the file sizes. Timings are
wall-clock on whatever else the machine is doing; run it on an idle machine for clean numbers.

usage:
  ANYSEG_SHARED=../shared python benchmarks/bench_onnx.py [--checkpoint PATH] [--image PATH]
      [--threads N] [--encoder-repeats 5] [--decoder-repeats 30] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _timeit(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), min(times)


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6


def main(argv=None) -> int:
    shared = Path(os.environ.get("ANYSEG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(shared / "golden" / "mobilesam_checkpoint.pth"))
    parser.add_argument("--image", default=str(shared / "images" / "dog.jpg"))
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and onnxruntime "
                        "(default: torch's default, usually the number of cores)")
    parser.add_argument("--encoder-repeats", type=int, default=5)
    parser.add_argument("--decoder-repeats", type=int, default=30)
    parser.add_argument("--workdir", default=None, help="where to write the graphs (default: a temp dir)")
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    import anyseg
    from anyseg.export import export_decoder, export_encoder, quantize
    from anyseg.imageio import load_image
    from anyseg.runtime import OnnxPredictor

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1

    image = load_image(args.image)
    model = anyseg.load_model(args.checkpoint, device="cpu")
    point = np.array([[image.shape[1] * 0.5, image.shape[0] * 0.5]])
    label = np.array([1])
    tmp = tempfile.TemporaryDirectory(prefix="bench_onnx_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"exporting to {work} ...", file=sys.stderr)
    dec = export_decoder(model, work / "decoder.onnx")
    enc = export_encoder(model, work / "encoder.onnx")
    from anyseg.export.quantize import default_keep_float

    keep = default_keep_float(enc)
    dec_q = quantize(dec, work / "decoder.int8.onnx")
    enc_q = quantize(enc, work / "encoder.int8.onnx")  # the default keeps sensitive layers float32
    dec_dq = quantize(dec, work / "decoder.dyn.onnx", method="dynamic")
    enc_dq = quantize(enc, work / "encoder.dyn.onnx", method="dynamic")

    rows = []
    torch_pred = anyseg.SamPredictor(model)
    rows.append(("torch fp32 (faithful)", "encoder", *_timeit(lambda: torch_pred.set_image(image), args.encoder_repeats), None))
    torch_pred.set_image(image)
    rows.append(("torch fp32 (faithful)", "decoder",
                 *_timeit(lambda: torch_pred.predict(point, label), args.decoder_repeats), None))
    for label_name, e, d in (("onnxruntime fp32", enc, dec), ("onnxruntime int8 weights", enc_q, dec_q),
                             ("onnxruntime int8 dynamic", enc_dq, dec_dq)):
        pred = OnnxPredictor(e, d, providers=["CPUExecutionProvider"], sess_options=opts)
        rows.append((label_name, "encoder", *_timeit(lambda p=pred: p.set_image(image), args.encoder_repeats),
                     _size_mb(e)))
        pred.set_image(image)
        rows.append((label_name, "decoder", *_timeit(lambda p=pred: p.predict(point, label), args.decoder_repeats),
                     _size_mb(d)))

    print(f"\n{Path(args.checkpoint).name}, image {image.shape[1]}x{image.shape[0]}, {threads} thread(s), "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    if keep:
        print(f"int8 weights encoder: linear layers matching {', '.join(keep)} kept in float32")
    print(f"{'path':<28}{'part':<10}{'median ms':>11}{'best ms':>10}{'file MB':>10}")
    for name, part, median, best, size in rows:
        size_text = f"{size:10.1f}" if size is not None else f"{'-':>10}"
        print(f"{name:<28}{part:<10}{median:11.1f}{best:10.1f}{size_text}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
