"""FastDecoder of another git revision against the working tree's, timed in one process, interleaved.

On a shared or throttled machine the speed of the whole machine drifts by tens of percent within
seconds, so two benchmark runs made one after the other cannot show a change of a few percent. This
script loads ``anyseg/fast/decoder.py`` as it was at ``--base`` (with ``git show``) next to the current
one, builds both on the same random-weight SAM mask decoder and image embedding, and times each part of
the decoder alternately (base, tree, tree, base, ...), so that both see the same machine. It prints the
minimum and the 10th percentile of each, and checks that both give the same logits.

Parts, for ``B`` prompts of two tokens each (a grid point and its padding, as segment-everything and a
click without a box give):
  transformer  FastDecoder.transformer (the two two-way blocks), with the low-rank image on a CPU
  final_iou    the final attention for the IoU token alone (segment-everything's filter)
  final        the final attention for the IoU token and three mask tokens
  hyper        the three hypernetworks on their tokens
  upscale      the upscaling network and the hypernetworks' product for three masks
  call         the whole decoder as SamPredictor.predict runs it (three masks)

usage:
  python benchmarks/bench_decoder_ab.py --base REV [--batches 1,64] [--seconds 6] [--parts ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

PARTS = ("transformer", "final_iou", "final", "hyper", "upscale", "call")


def load_decoder_at(rev: str):
    """``anyseg.fast.decoder`` as it was at git revision ``rev``, as a module of the installed package."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:anyseg/fast/decoder.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    name = "anyseg.fast._decoder_at_" + "".join(ch if ch.isalnum() else "_" for ch in rev)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "anyseg.fast"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:anyseg/fast/decoder.py", "exec"), module.__dict__)
    return module


def part_functions(fd, sparse):
    """name -> zero-argument callable for each part this FastDecoder version has."""
    out = {"call": lambda: fd(sparse, None, True)}
    q, tokens, keys, low_rank = fd.transformer(sparse, None, low_rank=True)
    out["transformer"] = lambda: fd.transformer(sparse, None, low_rank=True)
    out["final_iou"] = lambda: fd.final(q, tokens, keys, 0, 1)
    if hasattr(fd, "final_tokens"):
        out["final"] = lambda: fd.final_tokens(q, tokens, keys, [0, 2, 3, 4])
        final = fd.final_tokens(q, tokens, keys, [0, 2, 3, 4])
        if hasattr(fd, "hyper") and hasattr(fd, "upscale"):
            out["hyper"] = lambda: fd.hyper(final[:, 1:], [1, 2, 3])
            hyper = fd.hyper(final[:, 1:], [1, 2, 3])
            if low_rank is not None:
                low_rank.terms()
            out["upscale"] = lambda: fd.upscale(hyper, keys, low_rank)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~3, a tag)")
    parser.add_argument("--batches", default="1,64", help="comma-separated prompts per call")
    parser.add_argument("--seconds", type=float, default=6.0, help="time spent per part and batch (both sides)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error("--batches must look like 1,64")
    if any(b < 1 for b in batches):
        parser.error("--batches must be positive")

    import torch

    from anyseg.fast import decoder as tree_module
    from anyseg.fast.benchmark import _random_model
    from anyseg.speed import keep_freed_memory

    try:
        base_module = load_decoder_at(args.base)
    except subprocess.CalledProcessError as exc:
        print(f"cannot read anyseg/fast/decoder.py at {args.base!r}: {exc.stderr.strip()}", file=sys.stderr)
        return 2
    keep_freed_memory()  # as the lossless and auto presets do
    model = _random_model("vit_t", torch.device("cpu"))
    torch.manual_seed(1)
    embedding = torch.randn(1, 256, 64, 64)
    pe = model.prompt_encoder.get_dense_pe()
    chunk = getattr(tree_module, "CPU_UPSCALE_CHUNK", 8)
    rows = []
    with torch.inference_mode():
        sides = {}
        for label, module in (("base", base_module), ("tree", tree_module)):
            fd = module.FastDecoder(model.mask_decoder, pe, model.prompt_encoder.no_mask_embed.weight,
                                    mask_projection=model.prompt_encoder.mask_projection, upscale_chunk=chunk)
            fd.set_image(embedding)
            sides[label] = fd
        for batch in batches:
            sparse = torch.randn(batch, 2, 256)
            want, got = (sides[s](sparse, None, True) for s in ("base", "tree"))
            diff = max((got[0] - want[0]).abs().max().item(), (got[1] - want[1]).abs().max().item())
            try:
                fns = {s: part_functions(fd, sparse) for s, fd in sides.items()}
            except TypeError as exc:  # a revision from before FastDecoder.transformer(..., low_rank=...)
                print(f"the decoder at {args.base!r} lacks an interface this script times: {exc}", file=sys.stderr)
                return 2
            for part in args.parts:
                if part not in fns["base"] or part not in fns["tree"]:
                    print(f"skipping {part} at B={batch}: not in both versions", file=sys.stderr)
                    continue
                pair = {s: fns[s][part] for s in ("base", "tree")}
                for fn in pair.values():
                    fn()  # warm-up
                times = {"base": [], "tree": []}
                start = time.perf_counter()
                order = ("base", "tree")
                while time.perf_counter() - start < args.seconds or len(times["tree"]) < 3:
                    for side in order:
                        t0 = time.perf_counter()
                        pair[side]()
                        times[side].append((time.perf_counter() - t0) * 1000.0)
                    order = order[::-1]
                stats = {s: (min(v), sorted(v)[len(v) // 10]) for s, v in times.items()}
                rows.append((batch, part, len(times["tree"]), stats, diff))
    print(f"\nFastDecoder at {args.base} (base) against the working tree (tree), interleaved in one process; "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| prompts | part | runs each | base min (ms) | tree min (ms) | change | base p10 (ms) | tree p10 (ms) | change |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch, part, runs, stats, _ in rows:
        (bmin, bp10), (tmin, tp10) = stats["base"], stats["tree"]
        print(f"| {batch} | {part} | {runs} | {bmin:.2f} | {tmin:.2f} | {100 * (tmin / bmin - 1):+.1f}% "
              f"| {bp10:.2f} | {tp10:.2f} | {100 * (tp10 / bp10 - 1):+.1f}% |")
    diffs = {batch: diff for batch, _, _, _, diff in rows}
    print("\nlargest difference of low-res logits or IoU between the two: "
          + ", ".join(f"B={b}: {d:.1e}" for b, d in diffs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
