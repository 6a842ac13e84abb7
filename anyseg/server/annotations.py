"""Accepted objects, kept as one COCO JSON document and written atomically after every change.

The document is standard COCO (``images``, ``annotations``, ``categories``) with segmentations as
compressed RLE; each image also records ``anyseg_id``, the SHA-256 of its file content, which is how
the app finds an image's objects again (whatever its name). With a file path the whole document is
rewritten through :func:`anyseg.atomic.write_json_atomic` before a change is acknowledged, so a server
killed at any moment leaves either the previous or the new complete file, and every object the client
was told was saved is in it. Without a path the objects live in memory only.

Each object also records its ``provenance`` (an extra key that COCO readers ignore): how it was made
(``stage``: ``manual`` = drawn or given without the model, ``assisted`` = clicks decoded by the model,
``auto`` = an accepted auto-label proposal), the ``model`` that made it, the number of ``clicks`` and
the ``seconds`` spent on it. :meth:`AnnotationStore.stats` sums them up as the SAM paper reports its
data engine: masks per image, seconds per mask, share of each stage.
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
STAGES = ("manual", "assisted", "auto")
MAX_MODEL_CHARS = 300


class AnnotationStore:
    """Thread-safe COCO document with optional atomic persistence to ``path``."""

    def __init__(self, path: Optional[Path] = None, images_dir: Optional[Path] = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._doc: Dict[str, Any] = self._empty()
        if self.path is not None and self.path.exists():
            self._doc = self._read(self.path)
        if images_dir is not None:
            # Where the images of file_name live, so that 'anyseg train --data coco:FILE' finds them.
            self._doc["info"]["anyseg_images_dir"] = str(Path(images_dir).resolve())

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
            score: Optional[float] = None, provenance: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Store one object: ``mask`` is ``H x W`` bool in the original frame of image ``image_id``;
        ``provenance`` is checked by :func:`check_provenance` (default: manual, no model, 0 clicks)."""
        from .formats import encode_masks

        label = _check_label(label)
        provenance = check_provenance(provenance or {})
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
            ann["provenance"] = provenance
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


    # --------------------------------------------------------------------------------------- stats
    def stats(self, image_id: Optional[str] = None) -> Dict[str, Any]:
        """Effort and provenance figures, of all objects or of one image's.

        ``images`` (with at least one object), ``objects``, ``masks_per_image``, ``seconds_per_mask`` and
        ``clicks_per_mask`` (over objects that recorded them; None when none did), ``stages`` (per
        stage: ``objects``, ``share`` of all objects, ``seconds_per_mask``, ``clicks_per_mask``; objects
        saved without provenance count as ``unknown``) and ``models`` (objects per model name).
        """
        anns = self.list(image_id)
        groups: Dict[str, List[Dict[str, Any]]] = {stage: [] for stage in STAGES}
        models: Dict[str, int] = {}
        for ann in anns:
            prov = ann.get("provenance") if isinstance(ann.get("provenance"), dict) else {}
            stage = prov.get("stage") if prov.get("stage") in STAGES else "unknown"
            groups.setdefault(stage, []).append(prov)
            if prov.get("model"):
                models[str(prov["model"])] = models.get(str(prov["model"]), 0) + 1

        def mean(provs: List[Dict[str, Any]], key: str) -> Optional[float]:
            values = [float(p[key]) for p in provs if isinstance(p.get(key), (int, float))]
            return round(sum(values) / len(values), 3) if values else None

        everything = [p for provs in groups.values() for p in provs]
        n_images = len({a["anyseg_id"] for a in anns})
        return {
            "images": n_images,
            "objects": len(anns),
            "masks_per_image": round(len(anns) / n_images, 3) if n_images else 0.0,
            "seconds_per_mask": mean(everything, "seconds"),
            "clicks_per_mask": mean(everything, "clicks"),
            "stages": {stage: {"objects": len(provs), "share": round(len(provs) / len(anns), 4) if anns else 0.0,
                               "seconds_per_mask": mean(provs, "seconds"), "clicks_per_mask": mean(provs, "clicks")}
                       for stage, provs in groups.items()},
            "models": models,
        }


def check_provenance(given: Dict[str, Any]) -> Dict[str, Any]:
    """A provenance record from ``given`` (keys stage, model, clicks, seconds), checked: ValueError
    saying what was expected otherwise."""
    unknown = set(given) - {"stage", "model", "clicks", "seconds"}
    if unknown:
        raise ValueError(f"unknown provenance keys {sorted(unknown)}: expected stage, model, clicks, seconds")
    stage = given.get("stage", "manual")
    if stage not in STAGES:
        raise ValueError(f"provenance stage must be one of {', '.join(STAGES)}, got {stage!r}")
    model = given.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > MAX_MODEL_CHARS):
        raise ValueError(f"provenance model must be a name of at most {MAX_MODEL_CHARS} characters")
    clicks = given.get("clicks", 0)
    if isinstance(clicks, bool) or not isinstance(clicks, int) or not 0 <= clicks <= 100_000:
        raise ValueError(f"provenance clicks must be an integer in 0..100000, got {clicks!r}")
    seconds = given.get("seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= float(seconds) <= 86_400:
            raise ValueError(f"provenance seconds must be a number in 0..86400, got {seconds!r}")
        seconds = round(float(seconds), 3)
    return {"stage": stage, "model": model, "clicks": int(clicks), "seconds": seconds,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _next_id(items: List[Dict[str, Any]]) -> int:
    return max((int(it["id"]) for it in items), default=0) + 1


def _check_label(label: str) -> str:
    label = str(label).strip()
    if not label:
        raise ValueError("an object needs a non-empty label")
    if len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"labels are at most {MAX_LABEL_CHARS} characters, got {len(label)}")
    return label
