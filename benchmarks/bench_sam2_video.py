"""SAM 2 video tracking speed: frames/s and peak RSS tracking 1 and 4 objects, faithful vs the fast
paths (``SAM2VideoPredictor(speed=...)``), on the golden model and on a random-weight model of the
public tiny size; steady state (full memory bank) separately from the average; the CPU kind in the
header. Each configuration runs in its own subprocess (clean peak RSS).

    python benchmarks/bench_sam2_video.py                         # golden + tiny, 1 and 4 objects
    python benchmarks/bench_sam2_video.py --models tiny --objects 1 --repeats 3
    ANYSEG_SHARED=../shared python benchmarks/bench_sam2_video.py --frames 24 --json video.json

The implementation (and ``anyseg bench --tasks video``) is :mod:`anyseg.fast.video_bench`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyseg.fast.video_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
