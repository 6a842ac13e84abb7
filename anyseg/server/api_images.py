"""``/api/v1/images``: upload and encode, fetch embeddings and pixels, decode prompts, segment everything."""
import io
import time
from typing import Callable, List

import numpy as np

API = "/api/v1"


def add_image_routes(app, engine, settings, auth: List, image_info: Callable) -> None:
    from fastapi import File, HTTPException, Query, UploadFile
    from fastapi.responses import Response

    from .formats import b64_to_float32, encode_masks, float32_to_b64, mask_record
    from .schemas import DecodedMask, DecodeRequest, DecodeResponse, EverythingMask, EverythingRequest
    from .schemas import EverythingResponse, ImageInfo

    low_res_side = int(engine.mask_input_size)

    def entry_or_404(image_id: str):
        entry = engine.cache.get(image_id)
        if entry is None:
            raise HTTPException(404, f"unknown image id {image_id!r}: it was never encoded or has left the cache; "
                                     "upload the image again (POST /api/v1/images)")
        return entry

    @app.post(f"{API}/images", response_model=ImageInfo, tags=["images"], dependencies=auth,
              summary="upload an image and compute its embedding (cached by content hash)")
    def encode_upload(file: UploadFile = File(..., description="the image file (JPEG, PNG, TIFF, WebP, ...)"),
                      include_embedding: bool = Query(False, description="return the float32 embedding as base64")):
        data = file.file.read()
        entry, cached = engine.encode_bytes(data, file.filename or "")
        return image_info(entry, cached, include_embedding)

    @app.get(f"{API}/images/{{image_id}}", response_model=ImageInfo, tags=["images"], dependencies=auth,
             summary="sizes of an encoded image")
    def get_image(image_id: str):
        return image_info(engine.fresh(entry_or_404(image_id)), True, False)

    @app.get(f"{API}/images/{{image_id}}/embedding", tags=["images"], dependencies=auth,
             summary="the image embedding as raw little-endian float32 bytes (shape in X-Embedding-Shape)",
             responses={200: {"content": {"application/octet-stream": {}}}})
    def get_embedding(image_id: str):
        entry = engine.fresh(entry_or_404(image_id))  # of the model served now
        data = np.ascontiguousarray(entry.embedding, dtype="<f4").tobytes()
        shape = ",".join(str(s) for s in entry.embedding.shape)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Embedding-Shape": shape, "Cache-Control": "private, max-age=3600"})

    @app.get(f"{API}/images/{{image_id}}/image.png", tags=["images"], dependencies=auth,
             summary="the decoded image (EXIF orientation applied) as PNG",
             responses={200: {"content": {"image/png": {}}}})
    def get_pixels(image_id: str):
        from PIL import Image

        entry = entry_or_404(image_id)
        buffer = io.BytesIO()
        Image.fromarray(entry.image).save(buffer, format="PNG", compress_level=1)
        return Response(buffer.getvalue(), media_type="image/png")

    @app.post(f"{API}/images/{{image_id}}/decode", response_model=DecodeResponse, tags=["images"],
              dependencies=auth, summary="masks for one object from points, a box and/or previous logits")
    def decode(image_id: str, body: DecodeRequest):
        entry = entry_or_404(image_id)
        coords = labels = box = mask_input = None
        if body.points is not None or body.labels is not None:
            if body.points is None or body.labels is None or len(body.points) != len(body.labels):
                raise ValueError("points and labels must be given together, one label per point")
            if len(body.points) > settings.max_points:
                raise ValueError(f"at most {settings.max_points} points per request, got {len(body.points)}")
            if body.points:
                if any(len(p) != 2 for p in body.points):
                    raise ValueError("each point must be [x, y]")
                coords = np.asarray(body.points, dtype=np.float64)
                labels = np.asarray(body.labels, dtype=np.int64)
        if body.box is not None:
            box = np.asarray(body.box, dtype=np.float64)
        if body.mask_input is not None:
            mask_input = b64_to_float32(body.mask_input, (1, low_res_side, low_res_side), "mask_input")
        start = time.perf_counter()
        masks, scores, low_res, model_name = engine.decode_named(entry, coords, labels, box, mask_input,
                                                                 body.multimask, hq_token_only=body.hq_token_only)
        encoded = encode_masks(masks, body.format, polygon_tolerance=body.polygon_tolerance)
        elapsed = (time.perf_counter() - start) * 1000.0
        items = [DecodedMask(score=float(s), mask=m, **mask_record(mask)) for s, m, mask in zip(scores, encoded, masks)]
        h, w = entry.original_size
        return DecodeResponse(id=entry.id, width=w, height=h, format=body.format, masks=items,
                              low_res_logits=float32_to_b64(low_res) if body.return_logits else None,
                              low_res_shape=list(low_res.shape), decode_ms=round(elapsed, 2), model=model_name)

    @app.post(f"{API}/images/{{image_id}}/everything", response_model=EverythingResponse, tags=["images"],
              dependencies=auth, summary="segment everything: a grid of point prompts, filtered and deduplicated")
    def everything(image_id: str, body: EverythingRequest):
        entry = entry_or_404(image_id)
        if body.points_per_side > settings.max_everything_points_per_side:
            raise ValueError(f"points_per_side is at most {settings.max_everything_points_per_side} on this server")
        start = time.perf_counter()
        records = engine.everything(
            entry, points_per_side=body.points_per_side, points_per_batch=body.points_per_batch,
            pred_iou_thresh=body.pred_iou_thresh, stability_score_thresh=body.stability_score_thresh,
            box_nms_thresh=body.box_nms_thresh, min_mask_region_area=body.min_mask_region_area,
        )
        masks = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0, 1, 1), bool)
        encoded = encode_masks(masks, body.format, polygon_tolerance=body.polygon_tolerance) if records else []
        out = [EverythingMask(area=int(r["area"]), bbox=[float(v) for v in r["bbox"]],
                              predicted_iou=float(r["predicted_iou"]), stability_score=float(r["stability_score"]),
                              point_coords=[[float(v) for v in p] for p in r["point_coords"]], mask=m)
               for r, m in zip(records, encoded)]
        h, w = entry.original_size
        return EverythingResponse(id=entry.id, width=w, height=h, format=body.format, masks=out,
                                  elapsed_ms=round((time.perf_counter() - start) * 1000.0, 1))
