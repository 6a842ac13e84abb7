"""Concept prompts over HTTP: a SAM 3 model served next to the click model (``anyseg serve
--concept-model sam3``) finds every instance of a phrase and / or exemplar boxes in an encoded image,
returned as proposals the page can accept one by one (those covered by accepted objects hidden, as the
auto-label proposals)."""

import time
from collections import OrderedDict
from typing import List, Optional

import numpy as np

API = "/api/v1"
#: SAM 3 image features kept per image id (the public model's are about 90 MB per image).
FEATURE_CACHE_IMAGES = 2
NO_CONCEPT_MODEL = ("this server has no SAM 3 model for concept prompts: start it with --concept-model sam3 "
                    "(or a sam3.pt file)")


class ConceptFinder:
    """The SAM 3 side of the server: one :class:`~anyseg.Sam3Processor` (text encodings cached per
    phrase) and the image features of the last few images. Call :meth:`find` on the model thread."""

    def __init__(self, model, name: str) -> None:
        from ..sam3_processor import Sam3Processor

        self.name = name
        self.processor = Sam3Processor(model, resolution=model.image_size)
        self._states: "OrderedDict[str, dict]" = OrderedDict()

    def state(self, image_id: str, image: np.ndarray) -> dict:
        state = self._states.pop(image_id, None)
        if state is None:
            state = self.processor.set_image(image)
        self._states[image_id] = state
        while len(self._states) > FEATURE_CACHE_IMAGES:
            self._states.popitem(last=False)
        return state

    def find(self, image_id: str, image: np.ndarray, phrases: List[Optional[str]], boxes, positive,
             threshold: float):
        """``[(phrase, Sam3Result), ...]``: every instance of each phrase (None: the boxes alone)."""
        state = self.state(image_id, image)
        self.processor.set_confidence_threshold(threshold)
        return [(phrase, self.processor.segment(text=phrase, boxes=boxes, labels=positive, box_format="xyxy",
                                                state=state)) for phrase in phrases]


def add_concept_routes(app, engine, store, finder: Optional[ConceptFinder], auth: List) -> None:
    from fastapi import HTTPException

    from ..cli.sam3_text import split_phrases
    from .api_loop import uncovered_proposals
    from .contract import errors
    from .formats import encode_masks, mask_record
    from .schemas import ConceptInstance, ConceptRequest, ConceptResponse

    @app.post(f"{API}/images/{{image_id}}/concept", response_model=ConceptResponse, tags=["images"],
              dependencies=auth,
              summary="every instance of a phrase and / or exemplar boxes (SAM 3 concept prompt), as proposals",
              responses=errors(400, e400="invalid request: no phrase and no box, a box outside the image or "
                                         "not X0 <= X1, Y0 <= Y1, or no SAM 3 model on this server "
                                         "(serve --concept-model)"))
    def concept(image_id: str, body: ConceptRequest):
        if finder is None:
            raise ValueError(NO_CONCEPT_MODEL)
        entry = engine.cache.get(image_id)
        if entry is None:
            raise HTTPException(404, f"unknown image id {image_id!r}: it was never encoded or has left the cache; "
                                     "encode the image again")
        phrases: List[Optional[str]] = split_phrases(body.text) if body.text is not None else []
        if body.text is not None and not phrases:
            raise ValueError(f"text {body.text!r} holds no phrase (phrases are separated by '.')")
        if not phrases and not body.boxes:
            raise ValueError("give a text phrase and / or at least one exemplar box")
        h, w = entry.original_size
        for b in body.boxes:
            x0, y0, x1, y1 = b.xyxy
            if not (np.all(np.isfinite(b.xyxy)) and 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
                raise ValueError(f"exemplar box {b.xyxy} must be X0 <= X1, Y0 <= Y1 inside the {w}x{h} image "
                                 "(XYXY pixels)")
        start = time.perf_counter()
        found = engine.run(finder.find, entry.id, entry.image, phrases or [None], [b.xyxy for b in body.boxes],
                           [b.positive for b in body.boxes], body.threshold)
        candidates = [(phrase if phrase is not None else "exemplar", float(score), box, mask)
                      for phrase, result in found for mask, box, score in zip(result.masks, result.boxes, result.scores)]
        keep, hidden = uncovered_proposals(store, image_id, (h, w), [c[3] for c in candidates], body.min_area,
                                           body.overlap_thresh)
        kept = sorted((candidates[i] for i in keep), key=lambda k: -k[1])
        masks = np.stack([k[3] for k in kept]) if kept else np.zeros((0, h, w), bool)
        encoded = encode_masks(masks, body.format, polygon_tolerance=body.polygon_tolerance) if kept else []
        instances = [ConceptInstance(phrase=p, score=s, box=[float(v) for v in box], mask=m, **mask_record(mask))
                     for (p, s, box, mask), m in zip(kept, encoded)]
        presence = {(p if p is not None else "exemplar"): float(r.presence) for p, r in found}
        return ConceptResponse(id=entry.id, width=w, height=h, format=body.format, model=finder.name,
                               presence=presence, instances=instances, hidden=hidden,
                               elapsed_ms=round((time.perf_counter() - start) * 1000.0, 1))
