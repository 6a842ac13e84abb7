"""The model behind the HTTP API: encode images into the cache, decode prompts, segment everything.
(The decoder graphs for the browser are in :mod:`.page_decoder`.)

All model calls run one at a time on one worker thread: on a CPU the cores are better spent on one
request at a time than shared between several, and a single thread keeps peak memory predictable (the
C allocator keeps freed memory per thread, so inference spread over many request threads would hold
one working set per thread). Prompts are in original-image
pixels (XY) throughout.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..protocol import EncodedImage, ImagePredictor, make_predictor
from .cache import CacheEntry, EmbeddingCache

log = logging.getLogger("anyseg.server")


def content_id(data: bytes) -> str:
    """The id of an image: SHA-256 (hex) of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


class Engine:
    """A loaded model (of any family: it is only used through :mod:`anyseg.protocol`) and its embedding
    cache."""

    def __init__(self, model, cache: EmbeddingCache, *, max_pixels: int) -> None:
        self.model = model
        self.cache = cache
        self.max_pixels = max_pixels
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anyseg-model")
        self.encodes = 0
        # Model-level facts, read once; the predictors that run requests are made on the model thread.
        probe = make_predictor(model)
        self.family: str = probe.family
        self.mask_input_size: int = probe.mask_input_size
        self.embedding_shape = tuple(probe.embedding_shape)

    def predictor(self, entry: Optional[CacheEntry] = None) -> ImagePredictor:
        """A predictor of the model, holding ``entry``'s encoding when given (call on the model thread)."""
        predictor = make_predictor(self.model)
        if entry is not None:
            encoded = EncodedImage(entry.embedding, tuple(entry.state), entry.original_size, entry.input_size)
            # set_image with the entry's own pixels (what segment everything does for an uncropped image)
            # reuses the encoding instead of running the encoder again.
            predictor.set_encoded(encoded, image=entry.image)
        return predictor

    def run(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the model thread and return its result (or raise its error)."""
        return self._worker.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------------- encode
    def encode_bytes(self, data: bytes, name: str = "") -> Tuple[CacheEntry, bool]:
        """Decode and encode an image file's bytes (cached by content hash). Returns ``(entry, cached)``.

        Raises ValueError for empty, corrupt or over-large images.
        """
        return self.cache.get_or_create(content_id(data), lambda: self._encode(data, name))

    def _encode(self, data: bytes, name: str) -> CacheEntry:
        from PIL import Image

        from ..imageio import load_image

        try:
            image = load_image(data, max_pixels=self.max_pixels)
        except Image.DecompressionBombError as exc:  # Pillow's own guard, before ours when set lower
            raise ValueError(f"image refused: {exc}") from exc
        def work():
            predictor = self.predictor()
            predictor.set_image(image)
            self.encodes += 1
            return predictor.encoded()

        encoded = self.run(work)
        return CacheEntry(content_id(data), encoded.embedding, image, tuple(encoded.original_size),
                          tuple(encoded.input_size), name, state=tuple(encoded.state))

    # ---------------------------------------------------------------------------------------- decode
    def decode(
        self,
        entry: CacheEntry,
        point_coords: Optional[np.ndarray],
        point_labels: Optional[np.ndarray],
        box: Optional[np.ndarray],
        mask_input: Optional[np.ndarray],
        multimask: bool,
        hq_token_only: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one object: ``k x H x W`` bool, scores ``k``, low-res logits ``k x 256 x 256``.

        Points ``N x 2`` XY and box ``4`` XYXY are in original-image pixels; ``mask_input`` is
        ``1 x 256 x 256`` low-res logits of a previous prediction. Masks are sorted best first.
        ``hq_token_only`` (HQ-SAM models only) returns the HQ token's mask alone.
        """
        if hq_token_only and not getattr(self.model, "is_hq", False):
            raise ValueError("hq_token_only applies to HQ-SAM models only; the served model has no HQ token")
        if point_coords is None and box is None:
            raise ValueError("a decode request needs at least one point or a box")
        h, w = entry.original_size
        for what, arr in (("point", point_coords), ("box", box)):
            if arr is None:
                continue
            xy = np.asarray(arr, dtype=np.float64).reshape(-1, 2)
            outside = (xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)
            if outside.any():
                raise ValueError(f"{what} coordinates must lie inside the {w}x{h} image (XY pixels), "
                                 f"got {xy[outside].tolist()}")
        def work():
            hq = {"hq_token_only": True} if hq_token_only else {}
            return self.predictor(entry).decode(point_coords, point_labels, box, mask_input, multimask, **hq)

        masks, scores, low_res = self.run(work)
        order = np.argsort(-scores, kind="stable")
        return masks[order], scores[order], low_res[order]

    # ------------------------------------------------------------------------------------ everything
    def everything(self, entry: CacheEntry, **params: Any) -> List[Dict[str, Any]]:
        """Run the model's segment-everything generator on the entry's image with ``binary_mask`` output
        (:class:`~anyseg.protocol.UnsupportedByModel`, a ValueError, for a family that has none)."""
        def work():
            return self.predictor(entry).mask_generator(output_mode="binary_mask", **params).generate(entry.image)

        return self.run(work)
