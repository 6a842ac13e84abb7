"""SAM 2 image speed: faithful vs fast paths for set_image, one click and segment everything, with the
fast paths' quality on the golden SAM 2 checkpoint (``anyseg bench`` with the SAM 2 tasks).

    python benchmarks/bench_sam2_image.py                       # public SAM 2.1 tiny, random weights
    python benchmarks/bench_sam2_image.py --tasks sam2_encode sam2_click --repeats 9
    python benchmarks/bench_sam2_image.py --model sam2.1_hiera_b+ --random-weights --tasks sam2_encode
    python benchmarks/bench_sam2_image.py --model path/to/sam2.1_hiera_tiny.pt

Configurations alternate within each repeat; rows give medians (see docs/speed.md, "SAM 2").
Every ``anyseg bench`` option applies (``--help``); ``--tasks`` defaults to the SAM 2 ones.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyseg.cli.bench import main  # noqa: E402

SAM2_TASKS = ["sam2_encode", "sam2_click", "sam2_amg", "sam2_quality"]

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--tasks" not in argv and not any(a in ("-h", "--help") for a in argv):
        argv = ["--tasks", *SAM2_TASKS, *argv]
    sys.exit(main(argv))
