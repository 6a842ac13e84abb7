"""Segment a generated scene from a caption with a stand-in box source, as docs/beyond.md shows.

    python scripts/make-text-prompt-picture.py OUT_DIR ["red shape. blue shape."]

The box source here is a plain callable (the interface every detector plugs into): it knows the scene's
objects and names each by its colour, so the example runs offline; with real photographs use
``GroundingDinoSource``. Writes the outputs of ``anyseg segment --text`` (masks, overlay, JSON, COCO) for
the built-in ``nano`` model into OUT_DIR.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from anyseg import load_model
from anyseg.beyond.text import Detections, segment_text, split_phrases, write_text_outputs
from anyseg.protocol import make_predictor
from anyseg.train.synthetic import SyntheticDataset

COLOURS = {"red": (220, 50, 50), "green": (50, 180, 70), "blue": (50, 80, 220), "yellow": (230, 210, 50),
           "cyan": (60, 200, 210), "magenta": (200, 60, 200), "white": (235, 235, 235), "black": (20, 20, 20),
           "grey": (128, 128, 128), "orange": (240, 140, 40)}


def colour_name(pixels: np.ndarray) -> str:
    """The most common of the named colours nearest to each of ``pixels`` (``N x 3`` RGB)."""
    table = np.asarray(list(COLOURS.values()), dtype=np.float64)
    nearest = np.argmin(((pixels[:, None, :].astype(np.float64) - table[None]) ** 2).sum(-1), axis=1)
    return list(COLOURS)[int(np.bincount(nearest, minlength=len(COLOURS)).argmax())]


class SceneObjects:
    """A box source for a generated scene: one box per object whose colour name is in a caption phrase."""

    def __init__(self, masks: np.ndarray) -> None:
        self.masks = masks

    def __call__(self, image: np.ndarray, caption: str) -> Detections:
        phrases = split_phrases(caption)
        boxes, scores, labels = [], [], []
        for mask in self.masks:
            name = colour_name(image[mask])
            phrase = next((p for p in phrases if name in p.split()), None)
            if phrase is None:
                continue
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            scores.append(1.0)
            labels.append(phrase)
        return Detections(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores), labels)


def main(out: str, caption: str | None = None) -> int:
    sample = SyntheticDataset(count=1, seed=2026, size=384, objects=(3, 4)).render(0)
    source = SceneObjects(sample.masks)
    if caption is None:  # name the scene's first two objects
        names = [colour_name(sample.image[m]) for m in sample.masks[:2]]
        caption = ". ".join(f"{n} shape" for n in dict.fromkeys(names)) + "."
    result = segment_text(make_predictor(load_model("nano")), sample.image, caption, source)
    record = write_text_outputs(result, sample.image, Path(out), "scene", image_name="scene.png")
    print(f"{caption!r}: {len(result.labels)} objects: {', '.join(result.labels)} -> {out}")
    return 0 if record is not None else 1


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: make-text-prompt-picture.py OUT_DIR [CAPTION]")
    sys.exit(main(*sys.argv[1:]))
