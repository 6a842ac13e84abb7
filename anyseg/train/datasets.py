"""Instance-mask datasets for training and evaluation, and their conversion to the model frame.

Every dataset yields :class:`Sample`: an ``H x W x 3`` uint8 RGB image (grayscale and 16-bit files
are converted by :func:`anyseg.imageio.load_image`) and ``N x H x W`` bool instance masks in the same
original-image frame. Supported sources:

- COCO instances JSON (polygons, uncompressed and compressed RLE), images in a folder; ``coco:FILE``
  reads the annotation file of ``anyseg serve`` (images from the folder the server served);
- SA-1B: a folder of ``<name>.jpg`` images each with a ``<name>.json`` annotation file;
- a folder of images with instance label-map PNGs (0 = background, every other value one instance);
- the procedural synthetic dataset (:mod:`anyseg.train.synthetic`).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..geometry import resized_shape
from ..imageio import list_images, load_image


@dataclass
class Sample:
    """One image and its instance masks, both in the original-image frame.

    image: ``H x W x 3`` uint8 RGB. masks: ``N x H x W`` bool. kinds / parents: optional per-mask
    metadata (the synthetic data marks objects and parts).
    """

    image: np.ndarray
    masks: np.ndarray
    image_id: str = ""
    kinds: List[str] = field(default_factory=list)
    parents: List[int] = field(default_factory=list)


def _decode_coco_segmentation(seg, h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(seg, list):  # polygons: list of flat [x0, y0, x1, y1, ...]
            polys = [p for p in seg if len(p) >= 6]
            if not polys:
                return np.zeros((h, w), bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, *[int(v) for v in seg["size"]])
        elif isinstance(seg, dict) and "counts" in seg:  # compressed RLE
            counts = seg["counts"]
            rle = {"size": [int(v) for v in seg["size"]],
                   "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"expected a COCO segmentation (polygon list or RLE dict), got {type(seg).__name__}")
        mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (h, w):
        raise ValueError(f"segmentation is {mask.shape[0]}x{mask.shape[1]} but its image is {h}x{w}")
    return mask


class CocoInstances:
    """COCO instances JSON: ``images`` with file names and sizes, ``annotations`` with segmentations.

    Args:
        annotations: the JSON file.
        images: folder with the image files (default: the JSON's folder, or its ``images`` subfolder).
        include_crowd: keep ``iscrowd`` annotations (off: they cover groups, not instances).
        min_area: drop masks smaller than this many pixels.
        skip_missing: leave out images whose file is not in the folder (an app's annotation file may
            hold uploaded images that are not), instead of failing when one is read.
    Images without any kept annotation are skipped.
    """

    def __init__(self, annotations, images=None, include_crowd: bool = False, min_area: int = 1,
                 skip_missing: bool = False) -> None:
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise ValueError(f"{path}: expected a COCO instances file with 'images' and 'annotations'")
        if images is None:
            images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        self.root = Path(images)
        self.min_area = min_area
        self.path = path
        by_image: Dict[int, List[dict]] = {}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0) and not include_crowd:
                continue
            if "segmentation" not in ann:
                continue
            by_image.setdefault(ann["image_id"], []).append(ann)
        self.images = [img for img in data["images"] if img["id"] in by_image]
        self.annotations = by_image
        self.missing: List[str] = []
        if skip_missing:
            self.missing = [img["file_name"] for img in self.images if not (self.root / img["file_name"]).is_file()]
            self.images = [img for img in self.images if img["file_name"] not in self.missing]

    @property
    def key(self) -> str:
        stat = self.path.stat()
        return f"coco-{self.path.stem}-{stat.st_size}-{int(stat.st_mtime)}"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        info = self.images[index]
        image = load_image(self.root / info["file_name"])
        h, w = image.shape[:2]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(f"{info['file_name']}: the JSON says {info.get('height')}x{info.get('width')}, "
                             f"the file is {h}x{w}")
        masks = [_decode_coco_segmentation(a["segmentation"], h, w) for a in self.annotations[info["id"]]]
        masks = [m for m in masks if m.sum() >= self.min_area]
        stack = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        return Sample(image=image, masks=stack, image_id=str(info["id"]))


class SA1BFolder:
    """SA-1B layout: ``sa_1.jpg`` + ``sa_1.json`` pairs; each JSON has ``annotations[*].segmentation``
    as COCO RLE."""

    def __init__(self, folder, min_area: int = 1) -> None:
        self.root = Path(folder)
        if not self.root.is_dir():
            raise FileNotFoundError(f"SA-1B folder not found: {self.root}")
        self.pairs = [(p, p.with_suffix(".json")) for p in list_images(self.root)
                      if p.with_suffix(".json").is_file()]
        if not self.pairs:
            raise ValueError(f"{self.root}: expected images with a JSON annotation file of the same name "
                             f"(SA-1B layout), found none")
        self.min_area = min_area

    @property
    def key(self) -> str:
        return f"sa1b-{self.root.name}-{len(self.pairs)}"

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        image_path, json_path = self.pairs[index]
        image = load_image(image_path)
        h, w = image.shape[:2]
        data = json.loads(json_path.read_text())
        anns = data.get("annotations") if isinstance(data, dict) else None
        if anns is None:
            raise ValueError(f"{json_path}: expected an SA-1B annotation file with 'annotations'")
        masks = [_decode_coco_segmentation(a["segmentation"], h, w) for a in anns]
        masks = [m for m in masks if m.sum() >= self.min_area]
        stack = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        return Sample(image=image, masks=stack, image_id=image_path.stem)


def read_label_map(path) -> np.ndarray:
    """An instance label-map PNG -> ``H x W`` int64 ids (8- or 16-bit gray; RGB is read as 24-bit ids)."""
    with Image.open(path) as img:
        if img.mode in ("RGB", "RGBA"):
            arr = np.asarray(img.convert("RGB"), dtype=np.int64)
            return (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
        if img.mode == "P":
            return np.asarray(img, dtype=np.int64)  # palette index = instance id
        return np.asarray(img, dtype=np.int64)


class LabelMapFolder:
    """Images plus instance label maps with the same file stem.

    Layout: ``ROOT/images/*`` and ``ROOT/labels/*.png`` (``masks/`` is accepted for ``labels/``).
    In a label map 0 is background and every other value is one instance.
    """

    def __init__(self, folder, min_area: int = 1) -> None:
        root = Path(folder)
        image_dir = root / "images"
        label_dir = next((root / n for n in ("labels", "masks") if (root / n).is_dir()), None)
        if not image_dir.is_dir() or label_dir is None:
            raise ValueError(f"{root}: expected 'images/' and 'labels/' (or 'masks/') subfolders")
        labels = {p.stem: p for p in label_dir.glob("*.png")}
        self.pairs = [(p, labels[p.stem]) for p in list_images(image_dir) if p.stem in labels]
        if not self.pairs:
            raise ValueError(f"{root}: no image in images/ has a label map of the same name in {label_dir.name}/")
        self.root = root
        self.min_area = min_area

    @property
    def key(self) -> str:
        return f"labelmaps-{self.root.name}-{len(self.pairs)}"

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        image_path, label_path = self.pairs[index]
        image = load_image(image_path)
        labels = read_label_map(label_path)
        if labels.shape != image.shape[:2]:
            raise ValueError(f"{label_path}: label map is {labels.shape[0]}x{labels.shape[1]}, "
                             f"image is {image.shape[0]}x{image.shape[1]}")
        ids = [i for i in np.unique(labels) if i != 0]
        masks = [labels == i for i in ids]
        masks = [m for m in masks if m.sum() >= self.min_area]
        stack = np.stack(masks) if masks else np.zeros((0,) + labels.shape, bool)
        return Sample(image=image, masks=stack, image_id=image_path.stem)


def _parse_synthetic(spec: str):
    from .synthetic import SyntheticDataset

    kwargs: Dict[str, object] = {}
    rest = spec.split(":", 1)[1] if ":" in spec else ""
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item:
            raise ValueError(f"synthetic dataset options are key=value (count, seed, size, parts), got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key in ("count", "seed", "size", "min_area"):
            kwargs[key] = int(value)
        elif key == "parts":
            kwargs[key] = value.lower() in ("1", "true", "yes")
        elif key == "objects":
            lo, _, hi = value.partition("-")
            kwargs[key] = (int(lo), int(hi or lo))
        else:
            raise ValueError(f"unknown synthetic dataset option {key!r} (expected count, seed, size, objects, "
                             f"parts, min_area)")
    return SyntheticDataset(**kwargs)


def open_app_annotations(path, images=None) -> CocoInstances:
    """The annotation file of ``anyseg serve --annotations FILE`` as a training set: the images are read
    from ``images`` or else from the folder the server served (recorded in the file's ``info``); images
    not in that folder (uploads) are left out, with a warning."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"coco: annotation file not found: {path}")
    try:
        info = json.loads(path.read_text(encoding="utf-8")).get("info") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: expected the COCO JSON file written by anyseg serve ({exc})") from exc
    if images is None:
        images = info.get("anyseg_images_dir") if isinstance(info, dict) else None
        if not images:
            raise ValueError(f"{path} does not say which folder its images are in (it was written by a server "
                             "without --images, or by another tool): give the folder with --images DIR")
    if not Path(images).is_dir():
        raise FileNotFoundError(f"coco: image folder not found: {images} (give the served folder with --images)")
    dataset = CocoInstances(path, images=images, skip_missing=True)
    if dataset.missing:
        warnings.warn(f"{path}: {len(dataset.missing)} image(s) with objects are not in {images} and are left out "
                      f"(uploaded to the server rather than served from the folder?): {dataset.missing[:5]}")
    if not len(dataset):
        raise ValueError(f"{path}: no image with objects is in the folder {images}")
    return dataset


def open_dataset(spec, images=None):
    """Open a dataset from a string.

    - ``synthetic`` or ``synthetic:count=200,seed=0,size=128,objects=2-5,parts=1``
    - ``coco:FILE``: the annotation file of ``anyseg serve`` (images from the served folder, or ``images``)
    - a ``.json`` file: COCO instances (``images`` = the image folder, optional)
    - a folder with ``images/`` and ``labels/``: image + label-map pairs
    - a folder of ``*.jpg`` + ``*.json`` pairs: SA-1B
    """
    text = str(spec)
    if text == "synthetic" or text.startswith("synthetic:"):
        return _parse_synthetic(text)
    if text.startswith("coco:"):
        if not text[5:]:
            raise ValueError("coco: needs the annotation file, e.g. coco:labels.json")
        return open_app_annotations(text[5:], images)
    path = Path(text)
    if path.suffix.lower() == ".json":
        return CocoInstances(path, images=images)
    if path.is_dir():
        if (path / "images").is_dir() and ((path / "labels").is_dir() or (path / "masks").is_dir()):
            return LabelMapFolder(path)
        return SA1BFolder(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {text} (expected 'synthetic[:options]', a COCO .json file, "
                                f"or a folder)")
    raise ValueError(f"cannot tell the dataset format of {text}: expected 'synthetic[:options]', a COCO .json "
                     f"file, a folder with images/ and labels/, or an SA-1B folder")


@dataclass
class ModelFrameSample:
    """A sample resized into the model frame.

    image: ``3 x h x w`` float32 RGB in [0, 255], long side = img_size (not normalised, not padded).
    masks: ``N x S x S`` bool, resized (nearest) then zero-padded like the image.
    input_size: (h, w); original_size: (H, W).
    """

    image: "object"
    masks: "object"
    input_size: Tuple[int, int]
    original_size: Tuple[int, int]


def to_model_frame(sample: Sample, img_size: int, flip: bool = False) -> ModelFrameSample:
    """Resize image (PIL bilinear, as the predictor does) and masks (nearest) so the long side is
    ``img_size``; masks are padded to ``img_size x img_size``. ``flip`` mirrors both left-right."""
    import torch

    image, masks = sample.image, sample.masks
    if flip:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, img_size)
    resized = np.array(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR))
    out = np.zeros((len(masks), img_size, img_size), bool)
    for i, m in enumerate(masks):
        pil = Image.fromarray(np.ascontiguousarray(m).astype(np.uint8) * 255)
        out[i, :new_h, :new_w] = np.asarray(pil.resize((new_w, new_h), Image.NEAREST)) > 127
    tensor = torch.from_numpy(resized).permute(2, 0, 1).float()
    return ModelFrameSample(tensor, torch.from_numpy(out), (new_h, new_w), (h, w))


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """``N x H x W`` bool -> ``N x 4`` XYXY boxes with inclusive pixel indices (0s for empty masks)."""
    boxes = np.zeros((len(masks), 4), np.float64)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        if len(ys):
            boxes[i] = (xs[0], ys[0], xs[-1], ys[-1])
    return boxes


def select_masks(masks: np.ndarray, limit: Optional[int], rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``limit`` non-empty masks, chosen at random (all, in order, when ``limit`` is None)."""
    keep = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
    if limit is None or len(keep) <= limit:
        return keep
    return np.sort(rng.choice(keep, size=limit, replace=False))
