"""Accepted objects, kept as one COCO JSON document and written atomically after every change.

The document is standard COCO (``images``, ``annotations``, ``categories``) with segmentations as
compressed RLE; each image also records ``anyseg_id``, the SHA-256 of its file content, which is how
the app finds an image's objects again (whatever its name). With a file path the whole document is
rewritten through :func:`anyseg.atomic.write_json_atomic` before a change is acknowledged, so a server
killed at any moment leaves either the previous or the new complete file, and every object the client
was told was saved is in it. Without a path the objects live in memory only.
"""
from __future__ import annotations

import datetime as _dt
import json
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..atomic import write_json_atomic
from .formats import mask_box_xywh

MAX_LABEL_CHARS = 100


class AnnotationStore:
    """Thread-safe COCO document with optional atomic persistence to ``path``."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._doc: Dict[str, Any] = self._empty()
        if self.path is not None and self.path.exists():
            self._doc = self._read(self.path)

    # -------------------------------------------------------------------------------------- loading
    @staticmethod
    def _empty() -> Dict[str, Any]:
        return {
            "info": {"description": "objects labelled with anyseg",
                     "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
            "images": [], "annotations": [], "categories": [],
        }

    @staticmethod
    def _read(path: Path) -> Dict[str, Any]:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"could not read the annotations file '{path}': {exc}") from exc
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
            raise ValueError(f"'{path}' is not a COCO annotations file (expected 'images', 'annotations' and "
                             "'categories' lists)")
        doc.setdefault("info", {})
        return doc

    def _save(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self._doc)

    # ------------------------------------------------------------------------------------- queries
    def _image(self, image_id: str) -> Optional[Dict[str, Any]]:
        return next((im for im in self._doc["images"] if im.get("anyseg_id") == image_id), None)

    def _category_name(self, category_id: int) -> str:
        return next((c["name"] for c in self._doc["categories"] if c["id"] == category_id), "")

    def _public(self, ann: Dict[str, Any]) -> Dict[str, Any]:
        image = next((im for im in self._doc["images"] if im["id"] == ann["image_id"]), {})
        return {**ann, "label": self._category_name(ann["category_id"]), "anyseg_id": image.get("anyseg_id", "")}

    def list(self, image_id: Optional[str] = None) -> List[Dict[str, Any]]:
        """Annotations (with their ``label`` and image ``anyseg_id``), of one image or all."""
        with self._lock:
            anns = self._doc["annotations"]
            if image_id is not None:
                image = self._image(image_id)
                anns = [a for a in anns if image is not None and a["image_id"] == image["id"]]
            return [self._public(a) for a in anns]

    def get(self, ann_id: int) -> Dict[str, Any]:
        with self._lock:
            ann = self._find(ann_id)
            image = next(im for im in self._doc["images"] if im["id"] == ann["image_id"])
            return {**self._public(ann), "width": image["width"], "height": image["height"]}

    def document(self, image_id: Optional[str] = None) -> Dict[str, Any]:
        """A deep copy of the COCO document, optionally restricted to one image."""
        with self._lock:
            doc = json.loads(json.dumps(self._doc))
        if image_id is not None:
            doc["images"] = [im for im in doc["images"] if im.get("anyseg_id") == image_id]
            keep = {im["id"] for im in doc["images"]}
            doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
        return doc

    def _find(self, ann_id: int) -> Dict[str, Any]:
        ann = next((a for a in self._doc["annotations"] if a["id"] == ann_id), None)
        if ann is None:
            raise KeyError(f"no annotation with id {ann_id}")
        return ann

    # ------------------------------------------------------------------------------------- changes
    def add(self, *, image_id: str, file_name: str, size: tuple, label: str, mask: np.ndarray,
            score: Optional[float] = None) -> Dict[str, Any]:
        """Store one object: ``mask`` is ``H x W`` bool in the original frame of image ``image_id``."""
        from .formats import encode_masks

        label = _check_label(label)
        h, w = int(size[0]), int(size[1])
        if mask.shape != (h, w):
            raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is {w}x{h}")
        if not mask.any():
            raise ValueError("the mask is empty: an accepted object needs at least one pixel")
        rle = encode_masks(mask[None], "coco_rle")[0]
        with self._lock:
            image = self._image(image_id)
            if image is None:
                image = {"id": _next_id(self._doc["images"]), "file_name": file_name, "width": w, "height": h,
                         "anyseg_id": image_id}
                self._doc["images"].append(image)
            elif (image["height"], image["width"]) != (h, w):
                raise ValueError(f"image {image_id} was stored as {image['width']}x{image['height']}, got {w}x{h}")
            ann = {
                "id": _next_id(self._doc["annotations"]),
                "image_id": image["id"],
                "category_id": self._category_id(label),
                "segmentation": rle,
                "area": int(mask.sum()),
                "bbox": mask_box_xywh(mask),
                "iscrowd": 0,
            }
            if score is not None:
                ann["score"] = float(score)
            self._doc["annotations"].append(ann)
            self._save()
            return self._public(ann)

    def _category_id(self, label: str) -> int:
        for cat in self._doc["categories"]:
            if cat["name"] == label:
                return cat["id"]
        cat = {"id": _next_id(self._doc["categories"]), "name": label, "supercategory": ""}
        self._doc["categories"].append(cat)
        return cat["id"]

    def relabel(self, ann_id: int, label: str) -> Dict[str, Any]:
        label = _check_label(label)
        with self._lock:
            ann = self._find(ann_id)
            ann["category_id"] = self._category_id(label)
            self._save()
            return self._public(ann)

    def delete(self, ann_id: int) -> None:
        with self._lock:
            ann = self._find(ann_id)
            self._doc["annotations"].remove(ann)
            self._save()


def _next_id(items: List[Dict[str, Any]]) -> int:
    return max((int(it["id"]) for it in items), default=0) + 1


def _check_label(label: str) -> str:
    label = str(label).strip()
    if not label:
        raise ValueError("an object needs a non-empty label")
    if len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"labels are at most {MAX_LABEL_CHARS} characters, got {len(label)}")
    return label
