"""Time per prompt of the two-way transformer: the faithful MaskDecoder against FastDecoder.

This is the part of the mask decoder that segment-everything runs for every grid point (one click
runs it once): prompt tokens + image embedding -> IoU predictions, mask tokens and image tokens.
Upscaling and mask post-processing are not included: the faithful side is
``MaskDecoder.transformer`` plus the IoU head, the fast side ``FastDecoder.tokens`` (which includes the
IoU head). A random-weight SAM decoder (256 wide, 64 x 64 embedding grid, two prompt tokens per prompt
as a grid point gives) is timed at several batch sizes.

Prints a table: batch size, milliseconds per prompt (median of the repeats), speed-up; one prompt with
a mask prompt given as its dense embedding and as ``mask_hidden`` (through the per-image cache); the
upscaling network of one click (three masks) from the image tokens and from their low-rank form; one
click's whole decoder; then the
multiply-adds of one prompt through each part of the decoder (torch.utils.flop_counter).

usage:
  python benchmarks/bench_decoder_prompts.py [--batches 1,4,16,64] [--seconds 2] [--threads N]
      [--default-allocator]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def _per_prompt_ms(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0 / batch)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4,16,64", help="comma-separated prompts per call")
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent per row and path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (default: anyseg.speed.keep_freed_memory(), as the "
                             "lossless and auto presets do; it is process-wide, so compare in two runs)")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error("--batches must look like 1,4,16,64")
    if any(b < 1 for b in batches):
        parser.error("--batches must be positive")

    import torch

    from anyseg.config import MaskDecoderConfig
    from anyseg.fast.decoder import FastDecoder
    from anyseg.modeling.mask_decoder import MaskDecoder

    from anyseg.speed import keep_freed_memory

    allocator = "default allocator" if args.default_allocator else (
        "keep_freed_memory" if keep_freed_memory() else "default allocator (keep_freed_memory unavailable)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = MaskDecoder(MaskDecoderConfig()).eval()
    embedding, pe = torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64)
    no_mask = torch.randn(1, 256)
    fast = FastDecoder(decoder, pe, no_mask, mask_projection=torch.nn.Conv2d(16, 256, kernel_size=1))
    rows = []
    with torch.inference_mode():
        fast.set_image(embedding)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0).unsqueeze(0)
        for b in batches:
            sparse = torch.randn(b, 2, 256)
            dense = no_mask.view(1, -1, 1, 1).expand(b, -1, 64, 64)
            tokens_in = torch.cat([output_tokens.expand(b, -1, -1), sparse], dim=1)
            pos = pe.expand(b, -1, -1, -1)

            def faithful_step():
                hs, _ = decoder.transformer(embedding + dense, pos, tokens_in)
                return decoder.iou_prediction_head(hs[:, 0, :])

            faithful = _per_prompt_ms(faithful_step, b, args.seconds)
            tokens = _per_prompt_ms(lambda: fast.tokens(sparse), b, args.seconds)
            rows.append((b, faithful, tokens))
        # One refinement click: a point plus a mask prompt, given as the dense embedding (the first
        # block projects the image per prompt) or before its last 1 x 1 layer (through the cache).
        sparse = torch.randn(1, 2, 256)
        dense, hidden = torch.randn(1, 256, 64, 64), torch.randn(1, 16, 64, 64)
        refine = (_per_prompt_ms(lambda: fast.tokens(sparse, dense), 1, args.seconds),
                  _per_prompt_ms(lambda: fast.tokens(sparse, mask_hidden=hidden), 1, args.seconds))
        # The rest of a click's decoder work: the upscaling network for the three multimask candidates,
        # from the dense image tokens and from their low-rank form (what a CPU click uses).
        _, mask_tokens, image_tokens = fast.tokens(sparse)
        low_rank = fast.transformer(sparse, low_rank=True)[3]
        upscale = (_per_prompt_ms(lambda: fast.masks(mask_tokens, image_tokens, [1, 2, 3]), 1, args.seconds),
                   _per_prompt_ms(lambda: fast.masks(mask_tokens, image_tokens, [1, 2, 3], low_rank=low_rank),
                                  1, args.seconds))
        # A whole click's decoder as SamPredictor runs it (3 masks, low-res logits).
        click = _per_prompt_ms(lambda: fast(sparse, None, True), 1, args.seconds)
    print(f"\ntwo-way transformer per prompt, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"{allocator}")
    print("| prompts per call | faithful transformer + IoU head (ms / prompt) | FastDecoder.tokens (ms / prompt) | speed-up |")
    print("|---:|---:|---:|---:|")
    for b, faithful, tokens in rows:
        print(f"| {b} | {faithful:.1f} | {tokens:.1f} | {faithful / tokens:.2f}x |")
    print("\none prompt with a mask prompt (refinement), FastDecoder.tokens (ms)")
    print("| mask prompt given as dense | given as mask_hidden | speed-up |")
    print("|---:|---:|---:|")
    print(f"| {refine[0]:.1f} | {refine[1]:.1f} | {refine[0] / refine[1]:.2f}x |")
    print("\none click, upscaling network for its 3 candidates (FastDecoder.masks, ms)")
    print("| from the image tokens | from their low-rank form (CPU default) | speed-up |")
    print("|---:|---:|---:|")
    print(f"| {upscale[0]:.1f} | {upscale[1]:.1f} | {upscale[0] / upscale[1]:.2f}x |")
    print(f"\none click's whole decoder, 3 masks (FastDecoder call, as SamPredictor.predict runs it): {click:.1f} ms")
    _print_multiply_adds(decoder, fast, no_mask)
    return 0


def _print_multiply_adds(decoder, fast, no_mask) -> None:
    """Multiply-adds of one prompt (a point plus the padding point) through each part of the decoder,
    counted by torch.utils.flop_counter (matrix products; 2 FLOPs per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sparse = torch.randn(1, 2, 256)
    mask_prompt = torch.randn(1, 256, 64, 64)
    mask_hidden = torch.randn(1, 16, 64, 64)  # before the prompt encoder's last 1 x 1 layer
    m = decoder.num_mask_tokens

    def faithful_click():
        dense = no_mask.view(1, -1, 1, 1).expand(1, -1, 64, 64)
        return decoder(fast.cache.embedding, fast.image_pe, sparse, dense, True)

    parts = [
        ("faithful MaskDecoder, 3 masks", faithful_click),
        ("FastDecoder.tokens, no mask prompt (a click)", lambda: fast.tokens(sparse)),
        ("FastDecoder.tokens, with a mask prompt given as its dense embedding", lambda: fast.tokens(sparse, mask_prompt)),
        ("FastDecoder.tokens, with a mask prompt given as mask_hidden (refinement; the app's graph)",
         lambda: fast.tokens(sparse, mask_hidden=mask_hidden)),
        ("FastDecoder.transformer + final attention of the IoU token (segment everything)",
         lambda: fast.final(*fast.transformer(sparse), 0, 1)),
    ]
    with torch.inference_mode():
        _, mask_tokens, image_tokens = fast.tokens(sparse)
        low_rank = fast.transformer(sparse, low_rank=True)[3]
        parts += [(f"FastDecoder.masks, {k} masks (upscaling network)",
                   lambda k=k: fast.masks(mask_tokens, image_tokens, range(m - k, m))) for k in (3, m)]
        parts += [("FastDecoder.masks, 3 masks, from the low-rank image tokens (CPU default)",
                   lambda: fast.masks(mask_tokens, image_tokens, range(1, m), low_rank=low_rank)),
                  ("FastDecoder call, 3 masks (a whole click's decoder as SamPredictor runs it on a CPU)",
                   lambda: fast(sparse, None, True))]
        print("\nmultiply-adds per prompt")
        print("| part | G multiply-adds |")
        print("|---|---:|")
        for name, fn in parts:
            with FlopCounterMode(display=False) as counter:
                fn()
            print(f"| {name} | {counter.get_total_flops() / 2e9:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
