"""Render a synthetic scene for the demo and print a click on its first object as X,Y.

    python scripts/make-demo-image.py out/demo/scene.png   ->   writes the PNG, prints e.g. 131,87
"""
from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage

from anyseg.atomic import write_png_atomic
from anyseg.train.synthetic import SyntheticDataset


def main(path: str) -> int:
    sample = SyntheticDataset(count=1, seed=2026, size=384, objects=(3, 4)).render(0)
    write_png_atomic(path, sample.image)
    # The pixel of the first object farthest from its boundary: an unambiguous click.
    depth = ndimage.distance_transform_edt(sample.masks[0])
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    print(f"{x},{y}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make-demo-image.py OUT.png")
    sys.exit(main(sys.argv[1]))
