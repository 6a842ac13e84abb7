"""``/api/v1/annotations`` (accepted objects) and ``/api/v1/export`` (COCO JSON, polygons, PNG masks)."""
import io
from typing import List, Literal, Optional

import numpy as np

API = "/api/v1"


def add_annotation_routes(app, engine, store, auth: List) -> None:
    from fastapi import HTTPException, Query
    from fastapi.responses import JSONResponse, Response

    from ..masks import coco_rle_to_mask
    from .contract import errors
    from .formats import mask_to_png_bytes, segmentation_to_mask
    from .schemas import Annotation, AnnotationCreate, AnnotationList, AnnotationUpdate

    def find(ann_id: int):
        try:
            return store.get(ann_id)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None

    def download(name: str) -> dict:
        return {"Content-Disposition": f'attachment; filename="{name}"'}

    @app.get(f"{API}/annotations", response_model=AnnotationList, tags=["annotations"], dependencies=auth,
             summary="accepted objects, of one image (image_id) or all")
    def list_annotations(image_id: Optional[str] = Query(None, description="an image id (content hash)")):
        return AnnotationList(annotations=store.list(image_id), persistent=store.path is not None)

    @app.post(f"{API}/annotations", response_model=Annotation, status_code=201, tags=["annotations"],
              dependencies=auth, summary="accept an object (saved before the answer when a file is set)",
              responses=errors(404, e404="unknown image id: encode the image first"))
    def add_annotation(body: AnnotationCreate):
        entry = engine.cache.get(body.image_id)
        known = [a for a in store.document(body.image_id)["images"]]
        if entry is not None:
            size, name = entry.original_size, entry.name
        elif known:
            size, name = (known[0]["height"], known[0]["width"]), known[0]["file_name"]
        else:
            raise HTTPException(404, f"unknown image id {body.image_id!r}: encode the image first")
        mask = segmentation_to_mask(body.segmentation, size)
        provenance = body.provenance.model_dump() if body.provenance is not None else {}
        if provenance.get("stage") in ("assisted", "auto") and not provenance.get("model"):
            provenance["model"] = engine.model_name  # made by the model the server runs now
        return store.add(image_id=body.image_id, file_name=body.file_name or name or body.image_id, size=size,
                         label=body.label, mask=mask, score=body.score, provenance=provenance)

    @app.patch(f"{API}/annotations/{{ann_id}}", response_model=Annotation, tags=["annotations"], dependencies=auth,
               summary="change an object's label")
    def relabel(ann_id: int, body: AnnotationUpdate):
        find(ann_id)
        return store.relabel(ann_id, body.label)

    @app.delete(f"{API}/annotations/{{ann_id}}", status_code=204, tags=["annotations"], dependencies=auth,
                summary="remove an object")
    def delete(ann_id: int):
        find(ann_id)
        store.delete(ann_id)
        return Response(status_code=204)

    @app.get(f"{API}/annotations/{{ann_id}}/mask.png", tags=["annotations"], dependencies=auth,
             summary="one object's mask as PNG (255 = object)", responses={200: {"content": {"image/png": {}}}})
    def annotation_mask(ann_id: int):
        ann = find(ann_id)
        mask = coco_rle_to_mask(ann["segmentation"])
        return Response(mask_to_png_bytes(mask), media_type="image/png", headers=download(f"object_{ann_id}.png"))

    # -------------------------------------------------------------------------------------- export
    @app.get(f"{API}/export/coco", tags=["export"], dependencies=auth,
             summary="the COCO JSON of all objects (or of one image)")
    def export_coco(image_id: Optional[str] = None,
                    segmentation: Literal["rle", "polygons"] = Query("rle", description="RLE or COCO polygons")):
        doc = store.document(image_id)
        if segmentation == "polygons":
            from ..polygons import mask_to_polygons, to_coco_segmentation

            for ann in doc["annotations"]:
                ann["segmentation"] = to_coco_segmentation(mask_to_polygons(coco_rle_to_mask(ann["segmentation"])))
        return JSONResponse(doc, headers=download("annotations_coco.json"))

    @app.get(f"{API}/export/polygons", tags=["export"], dependencies=auth,
             summary="objects as polygons with holes, grouped by image")
    def export_polygons(image_id: Optional[str] = None, tolerance: float = Query(0.0, ge=0.0, le=100.0)):
        from ..polygons import mask_to_polygons

        doc = store.document(image_id)
        names = {c["id"]: c["name"] for c in doc["categories"]}
        images = []
        for im in doc["images"]:
            objects = [{"id": a["id"], "label": names.get(a["category_id"], ""),
                        "polygons": [p.to_dict() for p in mask_to_polygons(coco_rle_to_mask(a["segmentation"]),
                                                                             tolerance=tolerance)]}
                       for a in doc["annotations"] if a["image_id"] == im["id"]]
            images.append({"file_name": im["file_name"], "width": im["width"], "height": im["height"],
                           "anyseg_id": im.get("anyseg_id", ""), "objects": objects})
        return JSONResponse({"images": images}, headers=download("annotations_polygons.json"))

    @app.get(f"{API}/export/masks.png", tags=["export"], dependencies=auth,
             summary="instance label map of one image: pixel value = object number in list order (0 = none)",
             responses={200: {"content": {"image/png": {}}}, **errors(404, e404="no accepted objects for the image")})
    def export_label_map(image_id: str):
        from PIL import Image

        doc = store.document(image_id)
        if not doc["images"]:
            raise HTTPException(404, f"no accepted objects for image {image_id!r}")
        im = doc["images"][0]
        anns = doc["annotations"]
        dtype = np.uint8 if len(anns) < 256 else np.uint16
        labels = np.zeros((im["height"], im["width"]), dtype=dtype)
        for number, ann in enumerate(anns, start=1):
            labels[coco_rle_to_mask(ann["segmentation"])] = number  # later objects on top
        buffer = io.BytesIO()
        Image.fromarray(labels).save(buffer, format="PNG")
        stem = im["file_name"].rsplit("/", 1)[-1].rsplit(".", 1)[0] or "image"
        return Response(buffer.getvalue(), media_type="image/png", headers=download(f"{stem}_masks.png"))
