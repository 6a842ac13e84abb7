"""Speed benchmark: faithful vs fast paths (encode, one click, segment everything) and their quality.

    python benchmarks/bench_speed.py            # full table (about 10 minutes on a quiet 2-core CPU)
    python benchmarks/bench_speed.py --quick    # smaller grids, fewer repeats (a few minutes)
    python benchmarks/bench_speed.py --tasks click amg --json out.json --markdown out.md

GPU rows are added when CUDA is available. See docs/speed.md and ``anyseg bench --help``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyseg.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
