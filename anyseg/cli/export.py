"""``anyseg export``: write ONNX graphs of the decoder (and optionally the image encoder)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_arguments

DESCRIPTION = """\
Export SAM or SAM 2 to ONNX for onnxruntime, onnxruntime-web or any other ONNX runtime.

--decoder OUT.onnx   the prompt encoder + mask decoder (the per-click part, a few MB).
                     Inputs: image_embeddings 1x256x64x64, point_coords 1xNx2 (model frame),
                     point_labels 1xN (-1 pad, 0 bg, 1 fg, 2/3 box corners), mask_input 1x1x256x256,
                     has_mask_input (1,), orig_im_size (2,) = (H, W). Outputs: masks (logits at H x W),
                     iou_predictions, low_res_masks. One graph serves every image size.
--encoder OUT.onnx   the image encoder with normalisation and padding inside: input "image"
                     Bx3xhxw float RGB in [0, 255], resized so the long side is 1024.
                     Big encoders (ViT-L/H) are written with their weights in OUT.onnx.data.
SAM 2 models         the encoder takes the normalised 1x3x1024x1024 model input and also returns
                     high_res_feats_0 / high_res_feats_1, which the decoder takes besides
                     image_embeddings; prompts are scaled by 1024/W and 1024/H (no padding). The
                     decoder's output 0 is the single-mask answer with SAM 2's dynamic multimask
                     fallback applied; --fast-decoder and --use-stability-score are SAM 1 only.
HQ-SAM models        the encoder also returns interm_embeddings (1x64x64xD, the early feature), which
                     the decoder takes with hq_token_only (1,) (1 = the HQ mask alone). The decoder
                     returns k = 2: output 0 for multimask_output=False, output 1 for True (one
                     mask each, as HQ-SAM). --fast-decoder is not available for HQ-SAM.
--fast-decoder       compute the decoder with reordered float32 arithmetic (attention without
                     projecting the image tokens, transposed convolutions as matrix products):
                     the same masks to rounding, less work per click. The labelling app uses it.
--quantize [METHOD]  also write int8-quantized copies next to each graph (OUT.int8.onnx), about 2x
                     smaller. weights (default): int8 weights in blocks of 32, float activations
                     (masks closest to float32); dynamic: onnxruntime dynamic quantization, int8
                     activations too (faster int8 products on some CPUs, larger mask changes).

Export always runs on the CPU in float32. anyseg.runtime.OnnxPredictor runs the graphs of either
family without PyTorch (see docs/onnx.md)."""

EXAMPLES = """\
examples:
  anyseg export --model vit_b --decoder sam_vit_b_decoder.onnx
  anyseg export --model mobile_sam.pt --decoder dec.onnx --encoder enc.onnx --quantize
  anyseg export --model vit_h --decoder dec.onnx --return-single-mask --opset 17
  anyseg export --model vit_b --decoder dec_fast.onnx --fast-decoder
  anyseg export --model sam2.1_hiera_tiny.pt --decoder sam2_dec.onnx --encoder sam2_enc.onnx
  anyseg export --model sam_hq_vit_b.pth --decoder hq_dec.onnx --encoder hq_enc.onnx"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export the decoder (and encoder) to ONNX", description=DESCRIPTION,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--decoder", required=True, metavar="OUT.onnx", help="where to write the decoder graph")
    parser.add_argument("--encoder", default=None, metavar="OUT.onnx",
                        help="also write the image encoder graph here")
    parser.add_argument("--quantize", nargs="?", const="weights", default=None, choices=("weights", "dynamic"),
                        metavar="METHOD",
                        help="also write int8-quantized copies (<name>.int8.onnx) of every graph written: "
                             "weights (default; int8 weights, float activations) or dynamic")
    parser.add_argument("--keep-float", action="append", default=None, metavar="PART",
                        help="with --quantize: linear layers whose node name contains PART stay float32 "
                             "(repeatable; default: the layers quantize() keeps, image_encoder/layers.3/ for a MobileSAM "
                             "encoder quantized with int8 weights, none otherwise; --keep-float '' for none)")
    parser.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset, 13..20 (default: 17)")
    parser.add_argument("--return-single-mask", action="store_true",
                        help="decoder returns one mask: the best multimask output for a single click or a "
                             "box alone, the single-mask output for more prompts")
    parser.add_argument("--gelu-approximate", action="store_true",
                        help="use the tanh approximation of GELU in the decoder (for runtimes without Erf)")
    parser.add_argument("--use-stability-score", action="store_true",
                        help="decoder reports each mask's stability score instead of its predicted IoU")
    parser.add_argument("--fast-decoder", action="store_true",
                        help="export the decoder with the fast (reordered float32) arithmetic: same masks, "
                             "less work per click")
    parser.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                        help="encoder weights in a separate OUT.onnx.data file: auto = when above ~1.8 GB "
                             "(default), always, never (fails above 2 GB)")
    add_model_arguments(parser, speed=False, device=False)  # export always runs on the CPU
    parser.set_defaults(func=run)


def quantized_path(path: Path) -> Path:
    """``dec.onnx`` -> ``dec.int8.onnx``."""
    return path.with_name(path.stem + ".int8.onnx")


def _size(path: Path) -> str:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return f"{total / 1e6:.1f} MB"


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model
    from ..export import export_decoder, export_encoder, quantize
    from ..export._common import check_opset, check_output_path

    check_opset(args.opset)
    if args.keep_float is not None and not args.quantize:
        raise ValueError("--keep-float only applies with --quantize")
    outputs = [check_output_path(args.decoder)]
    if args.encoder is not None:
        outputs.append(check_output_path(args.encoder))
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ValueError("--decoder and --encoder must be different files")
    model = load_model(args.model, device="cpu")
    written = [export_decoder(model, args.decoder, opset=args.opset, return_single_mask=args.return_single_mask,
                              gelu_approximate=args.gelu_approximate,
                              use_stability_score=args.use_stability_score, fast=args.fast_decoder)]
    print(f"decoder: {written[-1]} ({_size(written[-1])})", file=sys.stderr)
    if args.encoder is not None:
        external = {"auto": None, "always": True, "never": False}[args.external_data]
        written.append(export_encoder(model, args.encoder, opset=args.opset, external_data=external))
        print(f"encoder: {written[-1]} ({_size(written[-1])})", file=sys.stderr)
    if args.quantize:
        from ..export.quantize import default_keep_float, linear_layer_names

        keep = {path: None for path in written}  # None: quantize's default for the graph
        if args.keep_float is not None:  # the parts given apply to the graphs they match
            parts = [part for part in args.keep_float if part]
            names = {path: linear_layer_names(path) for path in written}
            unmatched = [part for part in parts if not any(part in n for ns in names.values() for n in ns)]
            if unmatched:
                raise ValueError(f"--keep-float {', '.join(unmatched)} matches no linear layer of the exported graphs")
            keep = {path: [part for part in parts if any(part in n for n in names[path])] for path in written}
        for path in written:
            if keep[path] is None:
                for part in default_keep_float(path, args.quantize):
                    print(f"keeping {part} in float32 (masks are sensitive to it); --keep-float '' "
                          "quantizes it too", file=sys.stderr)
            q = quantize(path, quantized_path(path), method=args.quantize, keep_float=keep[path])
            print(f"int8:    {q} ({_size(q)})", file=sys.stderr)
    return 0
