"""Files for "segment everything" results: SA-1B JSON, COCO instances, PNG label maps, polygons.

Everything here works on the records of :meth:`anyseg.MaskGenerator.generate` (any ``output_mode``):
dicts with ``segmentation`` (an ``H x W`` bool array, an uncompressed RLE ``{"size": [H, W],
"counts": [int, ...]}`` or a COCO RLE ``{"size": [H, W], "counts": str}``), ``area`` (pixels),
``bbox`` (XYWH, image pixels; as in the reference SAM, ``W`` = last column - first column, one less
than COCO's pixel-count width), ``predicted_iou``, ``point_coords`` (``[[x, y]]``, image pixels),
``stability_score`` and ``crop_box`` (XYWH, image pixels). Only ``segmentation`` is required; the
other fields are computed or left out when missing.

Formats (all writers are atomic: a file appears complete or not at all):

* SA-1B per-image JSON: ``{"image": {image_id, width, height, file_name}, "annotations": [{id,
  segmentation (COCO RLE, counts as str), area, bbox, predicted_iou, point_coords, stability_score,
  crop_box}]}``, as in Meta's SA-1B release. Annotation ids are 1-based positions in the records.
* COCO instances JSON for many images (:class:`CocoBuilder`): ``images``, ``annotations`` (RLE or
  polygon ``segmentation``, ``category_id``, ``iscrowd`` 0, ``score`` = ``predicted_iou`` plus the
  SA-1B fields) and ``categories`` (one class-agnostic ``object`` category by default).
* Label map PNG: ``H x W`` instance ids, ``0`` background, id ``i + 1`` for record ``i``; larger masks
  are painted first so smaller ones on top of them stay visible. uint8 when there are at most 255
  masks, uint16 otherwise (at most 65535).
* Polygons JSON (``{"image": ..., "annotations": [{id, polygons: [{exterior, holes}], ...}]}``, XY in
  pixel-corner coordinates, holes kept) and YOLO segmentation text (one line per mask, coordinates
  normalised to ``[0, 1]``), see :mod:`anyseg.polygons`.

This module needs numpy, Pillow, pycocotools and scipy, not torch.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import write_bytes_atomic, write_json_atomic, write_png_atomic
from .polygons import mask_to_polygons, polygons_to_mask, to_coco_segmentation, to_yolo_seg_line

__all__ = [
    "OUTPUT_MODES", "DEFAULT_CATEGORY", "segmentation_size", "to_binary_mask", "to_coco_rle",
    "to_uncompressed_rle", "convert_segmentation", "image_info", "to_sa1b", "write_sa1b_json", "read_sa1b_json",
    "CocoBuilder", "read_coco_json", "label_map", "write_label_png", "read_label_png", "label_map_to_masks",
    "to_polygons_json", "write_polygons_json", "read_polygons_json", "to_yolo_seg", "write_yolo_seg",
    "read_yolo_seg",
]

PathLike = Union[str, "os.PathLike[str]"]
Record = Dict[str, Any]

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
DEFAULT_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
_FIELDS = ("area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box",
           "score", "category_id", "label")  # the last three: concept labelling (SAM 3), when present


# --------------------------------------------------------------------------------------------------
# Segmentations: binary mask <-> uncompressed RLE <-> COCO RLE


def _mask_utils():
    from pycocotools import mask as mask_utils

    return mask_utils


def _kind(seg: Any) -> str:
    if isinstance(seg, np.ndarray):
        if seg.ndim != 2:
            raise ValueError(f"a binary mask segmentation must be H x W, got shape {seg.shape}")
        return "binary_mask"
    if isinstance(seg, dict) and "size" in seg and "counts" in seg:
        return "coco_rle" if isinstance(seg["counts"], (str, bytes)) else "uncompressed_rle"
    raise ValueError("expected a segmentation as an H x W bool array or an RLE dict with 'size' and 'counts', "
                     f"got {type(seg).__name__}")


def segmentation_size(seg: Any) -> Tuple[int, int]:
    """``(H, W)`` of a segmentation in any of the three forms."""
    if _kind(seg) == "binary_mask":
        return int(seg.shape[0]), int(seg.shape[1])
    h, w = seg["size"]
    return int(h), int(w)


def to_binary_mask(seg: Any) -> np.ndarray:
    """Any segmentation form -> ``H x W`` bool array."""
    kind = _kind(seg)
    if kind == "binary_mask":
        return np.asarray(seg).astype(bool)
    h, w = segmentation_size(seg)
    if kind == "uncompressed_rle":
        counts = np.asarray(seg["counts"], dtype=np.int64)
        if counts.sum() != h * w or (counts < 0).any():
            raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected H * W = {h} * {w} = {h * w}")
        values = (np.arange(len(counts)) % 2).astype(bool)
        return np.repeat(values, counts).reshape(w, h).T  # column-major runs
    counts = seg["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2 copy keyword
        return _mask_utils().decode({"size": [h, w], "counts": counts}).astype(bool)


def to_coco_rle(seg: Any) -> Dict[str, Any]:
    """Any segmentation form -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    kind = _kind(seg)
    h, w = segmentation_size(seg)
    if kind == "coco_rle":
        counts = seg["counts"]
        return {"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
    if kind == "binary_mask":
        rle = _mask_utils().encode(np.asfortranarray(np.asarray(seg, dtype=np.uint8)))
    else:
        rle = _mask_utils().frPyObjects({"size": [h, w], "counts": [int(c) for c in seg["counts"]]}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def to_uncompressed_rle(seg: Any) -> Dict[str, Any]:
    """Any segmentation form -> ``{"size": [H, W], "counts": [int, ...]}`` (column-major runs, zeros first)."""
    if _kind(seg) == "uncompressed_rle":
        return {"size": list(segmentation_size(seg)), "counts": [int(c) for c in seg["counts"]]}
    mask = to_binary_mask(seg)
    h, w = mask.shape
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size])))
    if flat.size and flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [h, w], "counts": counts.tolist() if flat.size else [0]}


def convert_segmentation(seg: Any, output_mode: str) -> Any:
    """Convert a segmentation to ``output_mode`` (one of :data:`OUTPUT_MODES`)."""
    convert = {"binary_mask": to_binary_mask, "coco_rle": to_coco_rle, "uncompressed_rle": to_uncompressed_rle}
    if output_mode not in convert:
        raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}; got {output_mode!r}")
    return convert[output_mode](seg)


# --------------------------------------------------------------------------------------------------
# Records


def _image_size(records: Sequence[Record], width: Optional[int], height: Optional[int]) -> Tuple[int, int]:
    """``(width, height)`` from the arguments or the records' segmentations; checks they agree."""
    sizes = {segmentation_size(r["segmentation"]) for r in records}
    if len(sizes) > 1:
        raise ValueError(f"the records' segmentations have different sizes (H, W): {sorted(sizes)}")
    if sizes:
        h, w = sizes.pop()
        if (width is not None and int(width) != w) or (height is not None and int(height) != h):
            raise ValueError(f"the masks are {w} x {h} (W x H) but the image was given as {width} x {height}")
        return w, h
    if width is None or height is None:
        raise ValueError("with no records, give the image width and height")
    return int(width), int(height)


def _check_records(records: Iterable[Record]) -> List[Record]:
    records = list(records)
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "segmentation" not in record:
            raise ValueError(f"record {i} must be a dict with a 'segmentation' key, got {type(record).__name__}")
    return records


def _plain(value: Any) -> Any:
    """Numpy / tensor-like numbers and arrays -> plain Python numbers and lists (JSON ready)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _fields(record: Record, rle: Dict[str, Any]) -> Dict[str, Any]:
    """The SA-1B fields of a record (area and bbox computed from the mask when missing)."""
    out = {k: _plain(record[k]) for k in _FIELDS if k in record}
    out.setdefault("area", _area(rle))
    if "bbox" not in out:  # the generator's convention: W = last column - first column
        x, y, w, h = _coco_box(rle)
        out["bbox"] = [x, y, max(w - 1, 0), max(h - 1, 0)]
    return {k: out[k] for k in _FIELDS if k in out}  # one key order, computed or read back


def _coco_box(rle: Dict[str, Any]) -> List[int]:
    return [int(v) for v in _mask_utils().toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})]


def _record(annotation: Dict[str, Any], segmentation: Any, output_mode: str) -> Record:
    record = {"segmentation": convert_segmentation(segmentation, output_mode)}
    record.update({k: annotation[k] for k in _FIELDS if k in annotation})
    return record


def _load_json(source: Union[PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    if isinstance(source, dict):
        return source
    try:
        with open(source, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"'{source}' is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"'{source}' should hold a JSON object, found {type(data).__name__}")
    return data


def image_info(file_name: str, width: int, height: int, image_id: int = 0) -> Dict[str, Any]:
    """The ``image`` entry shared by the SA-1B and polygons JSON (and COCO ``images``)."""
    return {"image_id": int(image_id), "width": int(width), "height": int(height), "file_name": str(file_name)}


# --------------------------------------------------------------------------------------------------
# SA-1B


def to_sa1b(records: Iterable[Record], *, file_name: str, width: Optional[int] = None,
            height: Optional[int] = None, image_id: int = 0) -> Dict[str, Any]:
    """SA-1B dict for one image. ``width`` / ``height`` default to the masks' size (needed without records)."""
    records = _check_records(records)
    w, h = _image_size(records, width, height)
    annotations = []
    for i, record in enumerate(records, start=1):
        rle = to_coco_rle(record["segmentation"])
        annotations.append({"id": i, "segmentation": rle, **_fields(record, rle)})
    return {"image": image_info(file_name, w, h, image_id), "annotations": annotations}


def write_sa1b_json(path: PathLike, records: Iterable[Record], **image: Any) -> Path:
    """Write :func:`to_sa1b` ``(records, **image)`` to ``path`` atomically."""
    return write_json_atomic(path, to_sa1b(records, **image))


def read_sa1b_json(source: Union[PathLike, Dict[str, Any]],
                   output_mode: str = "binary_mask") -> Tuple[Dict[str, Any], List[Record]]:
    """Read an SA-1B JSON file (or its parsed dict) -> ``(image, records)``.

    ``records`` have the generator's keys, ``segmentation`` in ``output_mode``; they are checked to
    match the image size.
    """
    data = _load_json(source)
    image = data.get("image")
    if not isinstance(image, dict) or not {"width", "height"} <= set(image) or "annotations" not in data:
        raise ValueError(f"{source!r} is not SA-1B JSON: expected 'image' with width/height and 'annotations'")
    records = []
    for ann in data["annotations"]:
        seg = ann.get("segmentation")
        if segmentation_size(seg) != (int(image["height"]), int(image["width"])):
            raise ValueError(f"annotation {ann.get('id')} has size {seg['size']}, the image is "
                             f"{image['height']} x {image['width']} (H x W)")
        records.append(_record(ann, seg, output_mode))
    return image, records


# --------------------------------------------------------------------------------------------------
# COCO


class CocoBuilder:
    """Build a COCO instances JSON one image at a time.

    Args:
        segmentation: ``"rle"`` (COCO compressed RLE, lossless) or ``"polygon"`` (flat pixel-corner
            polygons; holes are joined by zero-width bridges, see :func:`anyseg.polygons.to_coco_segmentation`).
        tolerance: Douglas-Peucker tolerance in pixels for polygons (``0`` keeps the exact boundary).
        categories: COCO categories; a mask gets its record's ``category_id`` when it has one (concept
            labelling), else the first category's id (class-agnostic masks).
        info: optional COCO ``info`` dict.

    Annotation boxes are COCO's (XYWH, ``W`` and ``H`` count pixels), computed from the masks.
    Adding an image whose ``file_name`` is already present replaces it (same image id, its old
    annotations dropped), so a run can be redone image by image. Empty masks are left out in polygon
    mode (COCO cannot express an empty polygon list).
    """

    def __init__(self, *, segmentation: str = "rle", tolerance: float = 0.0,
                 categories: Optional[List[Dict[str, Any]]] = None, info: Optional[Dict[str, Any]] = None) -> None:
        if segmentation not in ("rle", "polygon"):
            raise ValueError(f"segmentation must be 'rle' or 'polygon', got {segmentation!r}")
        self.segmentation = segmentation
        self.tolerance = float(tolerance)
        self.categories = [dict(c) for c in (categories or [DEFAULT_CATEGORY])]
        if not self.categories or any("id" not in c or "name" not in c for c in self.categories):
            raise ValueError("categories must be a non-empty list of dicts with 'id' and 'name'")
        self.info = dict(info or {})
        self.images: Dict[str, Dict[str, Any]] = {}  # file_name -> COCO image entry
        self.annotations: Dict[int, List[Dict[str, Any]]] = {}  # image id -> its annotations
        self._next_ann_id = 1

    def add_image(self, records: Iterable[Record], *, file_name: str, width: Optional[int] = None,
                  height: Optional[int] = None, image_id: Optional[int] = None) -> int:
        """Add (or replace) one image and its masks; returns the image id."""
        records = _check_records(records)
        w, h = _image_size(records, width, height)
        old = self.images.get(file_name)
        if image_id is None:
            image_id = old["id"] if old else max((im["id"] for im in self.images.values()), default=0) + 1
        image_id = int(image_id)
        if any(im["id"] == image_id and name != file_name for name, im in self.images.items()):
            raise ValueError(f"image id {image_id} is already used by another image")
        if old is not None:
            self.annotations.pop(old["id"], None)
        self.images[file_name] = {"id": image_id, "file_name": file_name, "width": w, "height": h}
        anns = []
        known = {c["id"] for c in self.categories}
        for record in records:
            rle = to_coco_rle(record["segmentation"])
            fields = _fields(record, rle)
            if self.segmentation == "polygon":
                polys = mask_to_polygons(to_binary_mask(rle), tolerance=self.tolerance)
                seg: Any = to_coco_segmentation(polys)
                if not seg:
                    continue
            else:
                seg = rle
            fields["bbox"] = _coco_box(rle)  # W, H count pixels, unlike the generator's
            category = fields.pop("category_id", self.categories[0]["id"])
            fields.pop("label", None)  # the category's name says it
            if category not in known:
                raise ValueError(f"record category_id {category!r} is not one of the categories {sorted(known)}")
            ann = {"id": self._next_ann_id, "image_id": image_id, "category_id": category,
                   "segmentation": seg, "iscrowd": 0, **fields}
            if "predicted_iou" in fields and "score" not in fields:
                ann["score"] = fields["predicted_iou"]
            anns.append(ann)
            self._next_ann_id += 1
        self.annotations[image_id] = anns
        return image_id

    def __len__(self) -> int:
        return len(self.images)

    def to_dict(self) -> Dict[str, Any]:
        """The COCO dict: images by id, annotations by image then mask order."""
        images = sorted(self.images.values(), key=lambda im: im["id"])
        annotations = [a for im in images for a in self.annotations.get(im["id"], [])]
        out: Dict[str, Any] = {"images": images, "annotations": annotations, "categories": self.categories}
        if self.info:
            out = {"info": self.info, **out}
        return out

    def write(self, path: PathLike) -> Path:
        """Write the COCO JSON atomically (readers never see a half-written file)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, source: Union[PathLike, Dict[str, Any]], **kwargs: Any) -> "CocoBuilder":
        """Continue a COCO JSON written before (to add or replace images). Keyword args as the constructor."""
        data = _load_json(source)
        kwargs.setdefault("categories", data.get("categories"))
        kwargs.setdefault("info", data.get("info"))
        builder = cls(**kwargs)
        for im in data.get("images", []):
            builder.images[im["file_name"]] = dict(im)
            builder.annotations[im["id"]] = []
        for ann in data.get("annotations", []):
            builder.annotations.setdefault(ann["image_id"], []).append(ann)
            builder._next_ann_id = max(builder._next_ann_id, int(ann["id"]) + 1)
        return builder


def _coco_segmentation_to_rle(seg: Any, height: int, width: int) -> Dict[str, Any]:
    if isinstance(seg, list):  # polygons
        if not seg:
            return to_coco_rle(np.zeros((height, width), bool))
        mask_utils = _mask_utils()
        merged = mask_utils.merge(mask_utils.frPyObjects([list(map(float, p)) for p in seg], height, width))
        return {"size": [height, width], "counts": merged["counts"].decode("ascii")}
    if segmentation_size(seg) != (height, width):
        raise ValueError(f"segmentation size {seg['size']} does not match the image ({height} x {width}, H x W)")
    return to_coco_rle(seg)


def read_coco_json(source: Union[PathLike, Dict[str, Any]],
                   output_mode: str = "binary_mask") -> List[Tuple[Dict[str, Any], List[Record]]]:
    """Read a COCO instances JSON -> ``[(image, records), ...]`` in ``images`` order.

    Polygon, uncompressed RLE and COCO RLE segmentations are all decoded (polygons with
    pycocotools). Records carry the SA-1B fields present and ``category_id``.
    """
    data = _load_json(source)
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{source!r} is not COCO JSON: expected 'images' and 'annotations' lists")
    by_image: Dict[Any, List[Dict[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out = []
    for image in data["images"]:
        h, w = int(image["height"]), int(image["width"])
        records = []
        for ann in by_image.get(image["id"], []):
            record = _record(ann, _coco_segmentation_to_rle(ann["segmentation"], h, w), output_mode)
            record["category_id"] = ann.get("category_id")
            records.append(record)
        out.append((image, records))
    return out


# --------------------------------------------------------------------------------------------------
# Label maps


def label_map(masks: Union[Iterable[Record], Iterable[Any], np.ndarray], shape: Optional[Tuple[int, int]] = None,
              dtype: Optional[Any] = None) -> np.ndarray:
    """Paint masks into an ``H x W`` instance-id map: ``0`` background, ``i + 1`` for mask ``i``.

    Args:
        masks: records, segmentations in any form, or an ``N x H x W`` bool array.
        shape: ``(H, W)``; required only when there are no masks.
        dtype: output dtype; default uint8 for up to 255 masks, else uint16 (up to 65535 masks).
    Masks are painted from the largest to the smallest area (ties in input order), so where masks
    overlap the smaller one wins and stays visible.
    """
    segs = [m["segmentation"] if isinstance(m, dict) and "segmentation" in m else m for m in masks]
    n = len(segs)
    if dtype is None:
        dtype = np.uint8 if n <= 255 else np.uint16
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer) or n > np.iinfo(dtype).max:
        raise ValueError(f"{n} masks do not fit in a label map of dtype {dtype}")
    sizes = {segmentation_size(np.asarray(s) if not isinstance(s, dict) else s) for s in segs}
    if shape is not None:
        sizes.add((int(shape[0]), int(shape[1])))
    if len(sizes) != 1:
        raise ValueError(f"masks of different sizes: {sorted(sizes)}" if sizes
                         else "give the shape when there are no masks")
    out = np.zeros(sizes.pop(), dtype=dtype)
    segs = [s if isinstance(s, dict) else np.asarray(s) for s in segs]
    areas = [_area(s) for s in segs]
    for i in sorted(range(n), key=lambda k: -areas[k]):  # one decoded mask at a time
        out[to_binary_mask(segs[i])] = i + 1
    return out


def _area(seg: Any) -> int:
    kind = _kind(seg)
    if kind == "binary_mask":
        return int(np.count_nonzero(seg))
    if kind == "uncompressed_rle":
        return int(sum(seg["counts"][1::2]))
    return int(_mask_utils().area({"size": seg["size"], "counts": to_coco_rle(seg)["counts"].encode("ascii")}))


def write_label_png(path: PathLike, masks: Any, shape: Optional[Tuple[int, int]] = None) -> Path:
    """Write :func:`label_map` ``(masks, shape)`` as a grayscale PNG (8- or 16-bit) atomically."""
    return write_png_atomic(path, label_map(masks, shape))


def read_label_png(path: PathLike) -> np.ndarray:
    """Read a label-map PNG -> ``H x W`` int64 instance ids (0 = background)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "I;16", "I;16B", "I;16L", "I", "P"):
            raise ValueError(f"'{path}' is not a grayscale label map (PNG mode {im.mode})")
        return np.asarray(im).astype(np.int64)


def label_map_to_masks(labels: np.ndarray, count: Optional[int] = None) -> np.ndarray:
    """``H x W`` instance ids -> ``N x H x W`` bool masks for ids ``1..N`` (``N`` = ``count`` or the max id).

    These are the visible parts: where masks overlapped only the smaller one is in the map.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected an H x W label map, got shape {labels.shape}")
    n = int(labels.max(initial=0)) if count is None else int(count)
    return labels[None] == np.arange(1, n + 1)[:, None, None]


# --------------------------------------------------------------------------------------------------
# Polygons


def to_polygons_json(records: Iterable[Record], *, file_name: str, width: Optional[int] = None,
                     height: Optional[int] = None, image_id: int = 0, tolerance: float = 0.0,
                     min_area: float = 0) -> Dict[str, Any]:
    """Polygons of every mask, holes kept: ``{"image": ..., "annotations": [{id, polygons, ...}]}``.

    ``polygons`` is a list of ``{"exterior": [[x, y], ...], "holes": [[[x, y], ...], ...]}``, one
    per connected piece, XY in pixel-corner coordinates (see :func:`anyseg.polygons.mask_to_polygons`).
    """
    records = _check_records(records)
    w, h = _image_size(records, width, height)
    annotations = []
    for i, record in enumerate(records, start=1):
        rle = to_coco_rle(record["segmentation"])
        polys = mask_to_polygons(to_binary_mask(rle), tolerance=tolerance, min_area=min_area)
        annotations.append({"id": i, "polygons": [p.to_dict() for p in polys], **_fields(record, rle)})
    return {"image": image_info(file_name, w, h, image_id), "annotations": annotations}


def write_polygons_json(path: PathLike, records: Iterable[Record], **kwargs: Any) -> Path:
    """Write :func:`to_polygons_json` ``(records, **kwargs)`` to ``path`` atomically."""
    return write_json_atomic(path, to_polygons_json(records, **kwargs))


def read_polygons_json(source: Union[PathLike, Dict[str, Any]],
                       output_mode: str = "binary_mask") -> Tuple[Dict[str, Any], List[Record]]:
    """Read a polygons JSON -> ``(image, records)`` with the polygons rasterised (pixel centres inside)."""
    data = _load_json(source)
    image = data.get("image")
    if not isinstance(image, dict) or "annotations" not in data:
        raise ValueError(f"{source!r} is not a polygons JSON: expected 'image' and 'annotations'")
    shape = (int(image["height"]), int(image["width"]))
    records = [_record(ann, polygons_to_mask(ann.get("polygons", []), shape), output_mode)
               for ann in data["annotations"]]
    return image, records


def to_yolo_seg(records: Iterable[Record], *, class_id: int = 0, tolerance: float = 0.0) -> str:
    """YOLO segmentation label text: one ``class x1 y1 x2 y2 ...`` line per non-empty mask.

    Coordinates are normalised by the image width / height. YOLO has one ring per object, so the
    pieces and holes of a mask are joined by zero-width bridges (:func:`anyseg.polygons.merge_rings`).
    """
    lines = []
    for record in _check_records(records):
        mask = to_binary_mask(record["segmentation"])
        line = to_yolo_seg_line(class_id, mask_to_polygons(mask, tolerance=tolerance), mask.shape[1], mask.shape[0])
        if line:
            lines.append(line)
    return "".join(line + "\n" for line in lines)


def write_yolo_seg(path: PathLike, records: Iterable[Record], **kwargs: Any) -> Path:
    """Write :func:`to_yolo_seg` ``(records, **kwargs)`` to ``path`` atomically."""
    return write_bytes_atomic(path, to_yolo_seg(records, **kwargs).encode("utf-8"))


def read_yolo_seg(source: Union[PathLike, str], width: int, height: int) -> List[Tuple[int, np.ndarray]]:
    """Read YOLO segmentation labels (a path, or the text itself when it holds a newline or is empty)
    -> ``[(class_id, H x W bool mask), ...]``."""
    text = source if isinstance(source, str) and ("\n" in source or not source) else Path(source).read_text()
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 7 or len(parts) % 2 == 0:
            raise ValueError(f"YOLO line {n}: expected 'class x1 y1 x2 y2 x3 y3 ...', got {len(parts)} fields")
        xy = np.asarray(parts[1:], dtype=np.float64).reshape(-1, 2) * np.array([width, height], dtype=np.float64)
        out.append((int(parts[0]), polygons_to_mask([xy], (int(height), int(width)))))
    return out
