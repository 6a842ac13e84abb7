"""The data-engine routes: the served models and switching between them, auto-label proposals (the
semi-automatic stage) and the effort / provenance statistics of the accepted objects."""
import threading
import time
from typing import Callable, List, Optional

import numpy as np

API = "/api/v1"


def uncovered_proposals(store, image_id: str, shape, masks, min_area: int, overlap_thresh: float):
    """Which of ``masks`` (``H x W`` bool each, in order) to propose for an image: those with at least
    ``min_area`` pixels (and not empty) whose area is covered by the image's accepted objects for less than
    ``overlap_thresh``. Returns ``(indices kept, number hidden as covered)``; shared by the auto-label and
    concept-prompt proposals."""
    from ..masks import coco_rle_to_mask

    accepted = np.zeros(tuple(shape), bool)
    for ann in store.list(image_id):
        mask = coco_rle_to_mask(ann["segmentation"])
        if mask.shape == accepted.shape:
            accepted |= mask
    any_accepted = bool(accepted.any())
    kept, hidden = [], 0
    for i, mask in enumerate(masks):
        area = int(mask.sum())
        if area == 0 or area < min_area:
            continue
        if any_accepted and (mask & accepted).sum() / area >= max(overlap_thresh, 1e-9):
            hidden += 1
            continue
        kept.append(i)
    return kept, hidden


def add_loop_routes(app, engine, store, catalog, auth: List, make_decoder: Callable) -> None:
    from fastapi import HTTPException, Query

    from .contract import errors
    from .formats import encode_masks, mask_record
    from .models import UnknownModelError
    from .schemas import AutoLabelRequest, AutoLabelResponse, ModelInfo, ModelSwitchRequest, Proposal, Stats

    switching = threading.Lock()

    def loaded_info() -> ModelInfo:
        model = engine.model
        return ModelInfo(name=engine.model_name, loaded=True, family=engine.family,
                         encoder=type(model.image_encoder).__name__, img_size=int(model.img_size),
                         embedding_shape=[int(v) for v in engine.embedding_shape],
                         mask_threshold=float(model.mask_threshold))

    @app.get(f"{API}/models", response_model=list[ModelInfo], tags=["server"], dependencies=auth,
             summary="the model this server runs, and those it can switch to (--models)")
    def models():
        current = engine.model_name
        return [loaded_info()] + [ModelInfo(name=name, loaded=False) for name in catalog.names() if name != current]

    @app.post(f"{API}/models/switch", response_model=ModelInfo, tags=["server"], dependencies=auth,
              summary="serve another model from the next request on, without a restart",
              responses=errors(404, e404="no such model: see GET /api/v1/models"))
    def switch_model(body: ModelSwitchRequest):
        if body.name == engine.model_name:
            return loaded_info()
        try:
            model = catalog.load(body.name, engine.model.device)
        except UnknownModelError as exc:
            raise HTTPException(404, str(exc)) from None
        from ..protocol import model_family

        if model_family(model) != engine.family:
            raise ValueError(f"{body.name!r} is a {model_family(model)} model but this server runs {engine.family} "
                             "models: switching between model families needs a restart")
        with switching:  # one switch at a time, so that the decoder graphs and the model stay a pair
            # The page's decoder graphs follow: a new export starts (or is found on disk) with the switch.
            decoder = make_decoder(model)
            engine.switch(model, body.name)
            app.state.decoder = decoder
            return loaded_info()

    # ------------------------------------------------------------------------------- auto-label
    @app.post(f"{API}/images/{{image_id}}/auto-label", response_model=AutoLabelResponse, tags=["images"],
              dependencies=auth,
              summary="confident segment-everything proposals not yet covered by accepted objects")
    def auto_label(image_id: str, body: AutoLabelRequest):
        entry = engine.cache.get(image_id)
        if entry is None:
            raise HTTPException(404, f"unknown image id {image_id!r}: it was never encoded or has left the cache; "
                                     "encode the image again")
        start = time.perf_counter()
        records, name = engine.everything_named(
            entry, points_per_side=body.points_per_side, points_per_batch=body.points_per_batch,
            pred_iou_thresh=body.pred_iou_thresh, stability_score_thresh=body.stability_score_thresh,
            box_nms_thresh=body.box_nms_thresh, min_mask_region_area=0,
        )
        h, w = entry.original_size
        records = sorted(records, key=lambda r: -float(r["predicted_iou"]))
        keep, hidden = uncovered_proposals(store, image_id, (h, w), [r["segmentation"] for r in records],
                                           body.min_area, body.overlap_thresh)
        kept = [records[i] for i in keep]
        masks = np.stack([r["segmentation"] for r in kept]) if kept else np.zeros((0, h, w), bool)
        encoded = encode_masks(masks, body.format, polygon_tolerance=body.polygon_tolerance) if kept else []
        proposals = [Proposal(predicted_iou=float(r["predicted_iou"]), stability_score=float(r["stability_score"]),
                              point=[float(v) for v in r["point_coords"][0]], mask=m, **mask_record(r["segmentation"]))
                     for r, m in zip(kept, encoded)]
        return AutoLabelResponse(id=entry.id, width=w, height=h, format=body.format, model=name,
                                 proposals=proposals, hidden=hidden,
                                 elapsed_ms=round((time.perf_counter() - start) * 1000.0, 1))

    # ------------------------------------------------------------------------------------ stats
    @app.get(f"{API}/stats", response_model=Stats, tags=["annotations"], dependencies=auth,
             summary="effort and provenance of the accepted objects: masks per image, seconds per mask, stages")
    def stats(image_id: Optional[str] = Query(None, description="only this image's objects")):
        return store.stats(image_id)
