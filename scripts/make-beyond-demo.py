"""Write the generated inputs of the README's "Beyond clicks" examples into a folder.

    python scripts/make-beyond-demo.py demo/
writes demo/ref.png, demo/ref_mask.png, demo/target_0.png, demo/target_1.png (PerSAM), demo/scene.png
(object removal; a click on its object is printed) and demo/scan.nii.gz (a CT-like
volume; the box on its middle slice is printed)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from anyseg.atomic import write_png_atomic
from anyseg.beyond.demo import persam_scenes, removal_scene, volume_phantom


def main(folder: str) -> int:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (ref, ref_mask), targets = persam_scenes(2, seed=1)
    write_png_atomic(out / "ref.png", ref)
    write_png_atomic(out / "ref_mask.png", ref_mask)
    for i, (image, _) in enumerate(targets):
        write_png_atomic(out / f"target_{i}.png", image)
    image, mask, _ = removal_scene(seed=0)
    write_png_atomic(out / "scene.png", image)
    depth = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    print(f"remove: --point {x},{y}")

    vol, truth, affine = volume_phantom((64, 56, 14), seed=1)
    nib = __import__("nibabel")
    nib.save(nib.Nifti1Image(vol, affine), str(out / "scan.nii.gz"))
    z = vol.shape[2] // 2
    xs, ys = np.nonzero(truth[:, :, z])
    print(f"segment-volume: --box {z},{xs.min() - 2},{ys.min() - 2},{xs.max() + 2},{ys.max() + 2}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make-beyond-demo.py FOLDER")
    sys.exit(main(sys.argv[1]))
